"""What a model costs: parameters, MACs (compaware/costs.py), bytes on disk and measured
latency, in the inference forms of compaware/deploy/forms.py.

Latency comes from ``torch.utils.benchmark`` (median over blocked runs, thread count
recorded, and the runs' spread, with a warning when it is wide). The counts read shapes, not
values: zeroed weights cost the same until the layer is physically smaller, which is why
compaware compresses for real.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from compaware.config import BenchConfig, UserError
from compaware.costs import count_macs, count_params
from compaware.deploy.export import (
    compile_inductor,
    export_model,
    inductor_convs,
    onnxruntime_forward,
)
from compaware.deploy.fold import fold_batchnorm
from compaware.deploy.forms import FASTEST, FORMS
from compaware.deploy.model_file import keep_compressed
from compaware.deploy.pooling import swap_max_pools
from compaware.layers import weight_layers

log = logging.getLogger(__name__)


# A latency is flagged when the interquartile range of its blocked runs exceeds this share of
# their median: torch.utils.benchmark's own threshold for "significant environmental
# influence". On an idle machine a forward pass spreads by a few per cent; on a machine that
# other processes share, medians of the same model swing by up to 20× between runs, and their
# runs spread far beyond a quarter.
WIDE_SPREAD = 0.25


class Milliseconds(float):
    """A median time in milliseconds that keeps how widely the runs behind it spread:
    ``spread`` = interquartile range / median (None where unknown)."""

    spread: float | None

    def __new__(cls, median: float, spread: float | None = None) -> Milliseconds:
        value = super().__new__(cls, median)
        value.spread = spread
        return value


@torch.inference_mode()
def median_ms(forward: Callable[[torch.Tensor], object], batch: torch.Tensor,
              min_run_time: float, threads: int) -> Milliseconds:
    """Median wall time of ``forward(batch)`` in milliseconds, with its spread.

    ``torch.utils.benchmark`` warms up, synchronises CUDA and reports the median of
    blocked runs, which is robust to the noise of a shared machine; the spread says when
    that noise was too much for the median to mean much (:data:`WIDE_SPREAD`).
    """
    # Imported here: importing torch.utils.benchmark loads cpp_extension, which warns about
    # CUDA_HOME on machines with a CUDA toolkit but no GPU.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.benchmark as benchmark

    timer = benchmark.Timer(stmt="forward(batch)", globals={"forward": forward, "batch": batch},
                            num_threads=threads)
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    return Milliseconds(measured.median * 1e3, measured.iqr / measured.median)


def spread_verdict(latency: dict) -> list[str]:
    """Marks ``latency`` (a :func:`side_by_side_ms` section) with ``wide_spread``
    (``{batch_1: bool, batch_N: bool}``: some model's spread above :data:`WIDE_SPREAD`) and
    returns those timings as ``"batch_1 dense (41 %)"``."""
    wide = []
    latency["wide_spread"] = {}
    for key in ("batch_1", "batch_N"):
        spreads = latency.get("spread", {}).get(key, {})
        flagged = [f"{key} {name} ({spread:.0%})" for name, spread in spreads.items()
                   if spread is not None and spread > WIDE_SPREAD]
        latency["wide_spread"][key] = bool(flagged)
        wide += flagged
    return wide


def warn_wide_spread(latency: dict) -> None:
    """Marks every timed section of ``latency`` (results.json's ``latency_ms``) with
    :func:`spread_verdict` and logs one warning naming the timings that spread wide."""
    wide = [f"{form} {timing}" for form, section in latency.items() if section
            for timing in spread_verdict(section)]
    if wide:
        load = f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)" if hasattr(
            os, "getloadavg") else ""
        log.warning("Latency spread wide: the interquartile range of the runs exceeds %.0f %% "
                    "of their median for %s. The machine was busy%s, so these medians may be "
                    "far off; time on an idle machine or raise bench.min_run_time.",
                    WIDE_SPREAD * 100, ", ".join(wide), load)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` for the block (None: unchanged), the
    previous count restored after."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_ms(model: nn.Module, batch: torch.Tensor, min_run_time: float,
               threads: int) -> float:
    """Median wall time of one forward pass of ``batch`` in milliseconds (eval mode)."""
    model.eval()
    return median_ms(model, batch, min_run_time, threads)


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Each conv/linear layer's weight shape: the structure a compressor changed."""
    return {name: list(m.weight.shape) for name, m in weight_layers(model)}


def inference_model(model: nn.Module) -> nn.Module:
    """What is exported (``model_<name>.pt2``) and what the ``eager`` form times, dense and
    compressed alike, as a deployment would run it: an eval-mode copy of ``model`` with its
    BatchNorms folded (compaware/deploy/fold.py). Same function; every other form starts
    from it."""
    return fold_batchnorm(model)[0]


def channels_last_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``channels_last`` form: a copy of ``model`` with its 4-D weights in NHWC
    (``torch.channels_last``), as a forward function that converts a 4-D input the same way.

    oneDNN's CPU convolutions work in NHWC: given NCHW they reorder activations and weights
    on each call, a memory-bound cost that does not shrink with the MACs. At batch 32 NHWC
    made every model faster (dense ResNet-50 1.08×, pruned models more); at batch 1 it made
    some dense models slower (docs/performance.md), so it is a choice, not a default. The
    conversion of the input is timed with the model (a copy of the input, small next to a
    conv net's work)."""
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)

    return forward


def strided_pools_model(model: nn.Module) -> nn.Module:
    """The ``strided_pools`` form: a copy of ``model`` with every ``nn.MaxPool2d`` replaced by
    compaware/deploy/pooling.py's, which pools eagerly on NCHW CPU tensors as maxima of
    strided views, off PyTorch's slow NCHW kernel (same outputs, bit for bit)."""
    model = copy.deepcopy(model)
    swap_max_pools(model)
    return model


def form_forward(form: str, model: nn.Module, example: torch.Tensor,
                 convs: str = "onednn") -> Callable[[torch.Tensor], object]:
    """``model`` (an :func:`inference_model`) in ``form`` (a key of
    :data:`~compaware.deploy.forms.FORMS`), as a forward function of batches shaped like
    ``example`` (a traced form may fix the batch size): ``eager`` is ``model`` itself.
    ``inductor`` compiles with ``convs`` (see :data:`compaware.deploy.export.INDUCTOR_CONVS`)
    at torch's current thread count. A form the model cannot be built in (onnxruntime not
    installed, a model that cannot be exported or compiled) stops with a
    :class:`~compaware.config.UserError`."""
    if form == "eager":
        return model
    if form == "channels_last":
        return channels_last_forward(model)
    if form == "strided_pools":
        return strided_pools_model(model)
    if form == "inductor":
        return compile_inductor(model, example, convs)
    if form == "onnxruntime":
        with tempfile.TemporaryDirectory() as folder:  # the session holds the model
            return onnxruntime_forward(model, example, Path(folder) / "model.onnx",
                                       torch.get_num_threads())
    raise ValueError(f"{form!r} is not an inference form; the forms are {', '.join(FORMS)}")


def side_by_side_ms(models: dict[str, nn.Module], input_shape: tuple[int, ...],
                    forward_of: Callable[[str, nn.Module, torch.Tensor], Callable], *,
                    batch_size: int, device: torch.device, min_run_time: float,
                    threads: int) -> dict:
    """``{batch_1: {name: ms}, batch_N: {name: ms}}``: each model's ``forward_of(name, model,
    batch)`` timed at batch 1 and ``batch_size`` on ``device``, side by side in one process,
    with ``threads``, ``batch_size`` and ``device`` recorded, and under ``spread`` (same
    keys) each timing's :attr:`Milliseconds.spread`."""
    results: dict = {"threads": threads, "batch_size": batch_size, "device": str(device)}
    spread = {}
    for key, size in (("batch_1", 1), ("batch_N", batch_size)):
        batch = torch.randn(size, *input_shape, device=device)
        timed = {name: median_ms(forward_of(name, model, batch), batch, min_run_time, threads)
                 for name, model in models.items()}
        results[key] = {name: float(ms) for name, ms in timed.items()}
        spread[key] = {name: getattr(ms, "spread", None) for name, ms in timed.items()}
    return results | {"spread": spread}


def fastest_variant(timed: dict[str, dict]) -> tuple[dict, dict]:
    """``timed``: variant → :func:`side_by_side_ms` of the same models in that variant (a
    form, or Inductor's convs). Each model's time in its fastest variant at each batch size
    (in side_by_side_ms's form), and which variant that was: ``{batch_1: {name: variant},
    batch_N: {...}}``. What a deployment would pick, for the dense and the compressed model
    alike."""
    first = next(iter(timed.values()))
    results = {key: first[key] for key in ("threads", "batch_size", "device")}
    chosen, spread = {}, {}
    for key in ("batch_1", "batch_N"):
        chosen[key] = {name: min(timed, key=lambda variant: timed[variant][key][name])
                       for name in first[key]}
        results[key] = {name: timed[variant][key][name] for name, variant in chosen[key].items()}
        spread[key] = {name: timed[variant]["spread"][key][name]
                       for name, variant in chosen[key].items()}
    return results | {"spread": spread}, chosen


def form_latency(form: str, models: dict[str, nn.Module], input_shape: tuple[int, ...], *,
                 batch_size: int, min_run_time: float, threads: int,
                 device: torch.device | None = None) -> dict | None:
    """:func:`side_by_side_ms` of the models (each an :func:`inference_model`) in ``form`` (a
    key of :data:`~compaware.deploy.forms.FORMS`) on ``device`` (None: the CPU; the traced forms,
    inductor and onnxruntime, on the CPU only). Each model is built in the form at the batch size it
    is timed at (a traced module may fix it), with ``threads`` (Inductor builds its kernels
    for a thread count). ``inductor`` compiles each model with its convs on oneDNN and on
    PyTorch's own dispatch (:func:`~compaware.deploy.export.inductor_convs`), and keeps the
    faster at each batch size, recorded under ``convs``: small convs at batch 1 run faster
    without oneDNN's per-call set-up, large ones and batch 32 with it.
    None, with a warning, where the form is unavailable (onnxruntime not installed, a model
    that cannot be exported or compiled): the run's other results stand."""
    def built_with(convs: str) -> Callable:
        def forward_of(name: str, model: nn.Module, batch: torch.Tensor) -> Callable:
            if next(model.parameters()).device != batch.device:
                model = copy.deepcopy(model).to(batch.device)
            with torch_threads(threads):
                return form_forward(form, model, batch, convs)
        return forward_of

    def timed(convs: str = "onednn") -> dict:
        return side_by_side_ms(models, input_shape, built_with(convs), batch_size=batch_size,
                               device=device or torch.device("cpu"),
                               min_run_time=min_run_time, threads=threads)

    try:
        if form != "inductor":
            return timed()
        results, convs = fastest_variant({convs: timed(convs) for convs in inductor_convs()})
        return {**results, "convs": convs}
    except UserError as e:
        log.warning("bench.forms has %s, but there is no latency %s: %s", form, FORMS[form], e)
        return None


def fastest_latency(timed: dict[str, dict | None]) -> dict | None:
    """The ``fastest`` choice: ``timed`` (form → :func:`form_latency`) reduced to each model's
    time in its fastest form at each batch size, the form recorded under ``forms``; None
    where no form was timed."""
    timed = {form: result for form, result in timed.items() if result}
    if not timed:
        return None
    results, forms = fastest_variant(timed)
    return {**results, "forms": forms}


def compression_rates(dense: nn.Module, compressed: nn.Module, stored_bytes: int) -> dict:
    """The rates of docs/compression.md that do not need a clock: ``params_ratio`` = dense
    parameters / non-zero parameters of the compressed model (Han 2015; ``nonzero_params``, the
    report's non-zero ratio, not its structural params ratio), ``nonzero_fraction`` = its
    inverse, ``storage_ratio`` = dense parameters at 32 bits / bits of the stored file
    (Deep Compression, soft weight-sharing)."""
    dense_params = count_params(dense)
    nonzero = sum(int(p.count_nonzero()) for p in compressed.parameters())
    return {"params_ratio": dense_params / max(nonzero, 1), "nonzero_params": nonzero,
            "storage_ratio": 32 * dense_params / (8 * stored_bytes),
            "nonzero_fraction": nonzero / dense_params}


def efficiency(macs: dict, latency: dict | None) -> dict:
    """``{batch_1, batch_N}``: the latency ratio (dense ms / compressed ms) ÷ the MACs ratio
    (dense / compressed MACs), how much of the MAC saving became wall-clock time (1: all of
    it); None without a latency measurement."""
    macs_ratio = macs["dense"] / max(macs["compressed"], 1)
    return {key: latency[key]["dense"] / latency[key]["compressed"] / macs_ratio
            if latency else None for key in ("batch_1", "batch_N")}


def measure(models: dict[str, nn.Module], input_shape: tuple[int, ...], cfg: BenchConfig,
            run_dir: Path, stored: dict | None = None, details: dict | None = None) -> dict:
    """The results.json sections of the ``dense`` and the ``compressed`` model (the keys of
    ``models``), ready to be written:

    - ``params``, ``macs``, ``structure`` (layer shapes): of the models as trained;
    - ``bytes``: of the standalone file ``model_<name>.pt2`` of each :func:`inference_model`
      (written to ``run_dir``), except where the compressor stored the compressed model in a
      format of its own: ``stored`` (what its ``save`` returned), whose ``bytes`` are then
      ``bytes.compressed``, the .pt2 file's ``bytes.compressed_pt2``;
    - ``latency_ms``: each model's :func:`inference_model` timed in each form of
      ``bench.forms`` on the CPU (``latency_ms.<form>``; None for a form not timed),
      ``fastest`` (with ``bench.fastest=true``) and ``cuda`` (eager, where CUDA is available);
    - ``efficiency`` (in the eager form) and ``efficiency_<form>`` (every other form and
      ``fastest``): :func:`efficiency`;
    - ``compression``: the compressor's report (``details``), ``stored`` as ``storage``, and
      :func:`compression_rates`.

    Nothing is timed in a form not asked for: the default times the very model exported.
    Beside the .pt2 files, the compressed model is kept trainable (``model_compressed.pt``) and
    as ONNX (``model_compressed.onnx``): :func:`~compaware.deploy.model_file.keep_compressed`."""
    costs: dict = {key: {} for key in ("params", "macs", "bytes", "structure")}
    inference = {}
    for name, model in models.items():
        costs["params"][name] = count_params(model)
        costs["macs"][name] = count_macs(model, input_shape)
        inference[name] = inference_model(model)
        costs["bytes"][name] = export_model(inference[name], torch.zeros(2, *input_shape),
                                            run_dir / f"model_{name}.pt2")
        costs["structure"][name] = layer_shapes(model)
    keep_compressed(models["compressed"], inference["compressed"], input_shape, run_dir)
    if stored:
        costs["bytes"]["compressed_pt2"] = costs["bytes"]["compressed"]
        costs["bytes"]["compressed"] = stored["bytes"]
    timing = {"batch_size": cfg.batch_size, "min_run_time": cfg.min_run_time,
              "threads": cfg.threads or torch.get_num_threads()}
    latency: dict = dict.fromkeys([*FORMS, FASTEST, "cuda"])
    if cfg.latency:
        for form in cfg.forms:
            latency[form] = form_latency(form, inference, input_shape, **timing)
        if cfg.fastest:
            latency[FASTEST] = fastest_latency({form: latency[form] for form in cfg.forms})
        if torch.cuda.is_available():
            latency["cuda"] = form_latency("eager", inference, input_shape, **timing,
                                           device=torch.device("cuda"))
    warn_wide_spread(latency)
    costs["latency_ms"] = latency
    costs["efficiency"] = efficiency(costs["macs"], latency["eager"])
    for form in [*FORMS, FASTEST]:
        if form != "eager":
            costs[f"efficiency_{form}"] = efficiency(costs["macs"], latency[form])
    compression = {"details": details} | ({"storage": stored} if stored else {})
    costs["compression"] = compression | compression_rates(
        models["dense"], models["compressed"], costs["bytes"]["compressed"])
    return costs
