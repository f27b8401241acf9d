"""What a model costs: parameters, MACs, bytes on disk and measured latency.

MACs come from ``torch.utils.flop_counter`` (FLOPs / 2: it counts 2 per
multiply-accumulate of convs, linears and matmuls), latency from
``torch.utils.benchmark`` (median over blocked runs, thread count recorded). The
counters read shapes, not values: zeroed weights cost the same until the layer is
physically smaller, which is why compaware compresses for real.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compaware.config import BenchConfig, UserError
from compaware.deploy.export import (
    compile_inductor,
    export_model,
    inductor_convs,
    onnxruntime_forward,
)
from compaware.deploy.fold import fold_batchnorm
from compaware.layers import eval_mode, weight_layers
from compaware.deploy.pooling import swap_max_pools

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single input of ``input_shape`` (C, H, W)."""
    param = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@torch.inference_mode()
def median_ms(forward: Callable[[torch.Tensor], object], batch: torch.Tensor,
              min_run_time: float, threads: int) -> float:
    """Median wall time of ``forward(batch)`` in milliseconds.

    ``torch.utils.benchmark`` warms up, synchronises CUDA and reports the median of
    blocked runs, which is robust to the noise of a shared machine.
    """
    # Imported here: importing torch.utils.benchmark loads cpp_extension, which warns about
    # CUDA_HOME on machines with a CUDA toolkit but no GPU.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.benchmark as benchmark

    timer = benchmark.Timer(stmt="forward(batch)", globals={"forward": forward, "batch": batch},
                            num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


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


def channels_last_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy of ``model`` with its 4-D weights in NHWC (``torch.channels_last``), as a
    forward function that converts a 4-D input the same way.

    oneDNN's CPU convolutions work in NHWC: given NCHW they reorder activations and weights
    on each call, a memory-bound cost that does not shrink with the MACs. At batch 32 NHWC
    made ResNet-50 1.08× (dense) and 1.15× (pruned at 0.5) faster; at batch 1 it made the
    dense model 1.17× slower (docs/performance.md), so it is a choice, not a default. The
    conversion of the input is timed with the model (a copy of the input, small next to a
    conv net's work)."""
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)

    return forward


def latency_ms(model: nn.Module, batch: torch.Tensor, min_run_time: float,
               threads: int) -> float:
    """Median wall time of one forward pass of ``batch`` in milliseconds (eval mode)."""
    model.eval()
    return median_ms(model, batch, min_run_time, threads)


def inference_model(model: nn.Module) -> nn.Module:
    """What is timed and exported, dense and compressed alike, as a deployment would run it:
    an eval-mode copy of ``model`` with its BatchNorms folded (compaware/fold.py) and its
    max-pools off PyTorch's slow NCHW kernel (compaware/pooling.py). Same function."""
    folded = fold_batchnorm(model)[0]
    swap_max_pools(folded)
    return folded


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Each conv/linear layer's weight shape: the structure a compressor changed."""
    return {name: list(m.weight.shape) for name, m in weight_layers(model)}


def side_by_side_ms(models: dict[str, nn.Module], input_shape: tuple[int, ...],
                    batch_size: int, device: torch.device, min_run_time: float, threads: int,
                    forward_of: Callable[[str, nn.Module, torch.Tensor], Callable]) -> dict:
    """``{batch_1: {name: ms}, batch_N: {name: ms}}``: each model's ``forward_of(name, model,
    batch)`` timed at batch 1 and ``batch_size`` on ``device``, side by side in one process,
    with ``threads``, ``batch_size`` and ``device`` recorded."""
    results: dict = {"threads": threads, "batch_size": batch_size, "device": str(device)}
    for key, size in (("batch_1", 1), ("batch_N", batch_size)):
        batch = torch.randn(size, *input_shape, device=device)
        results[key] = {name: median_ms(forward_of(name, model, batch), batch, min_run_time,
                                        threads)
                        for name, model in models.items()}
    return results


def compare_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch_size: int,
                    device: torch.device, min_run_time: float, threads: int,
                    layout: str = "nchw") -> dict:
    """:func:`side_by_side_ms` of the models in eager PyTorch on ``device`` (copies: the
    models stay where they are), in ``layout``: ``nchw``, ``nhwc``
    (:func:`channels_last_forward`) or ``fastest``: each model in whichever of the two runs
    it faster at each batch size, recorded under ``layouts``. NHWC makes some models faster
    and others slower, and differently at batch 1 and batch 32 (docs/performance.md): timed
    in one fixed layout, a compressed model can look better or worse than it deploys."""
    def forward_in(form: str) -> Callable:
        def forward_of(name: str, model: nn.Module, batch: torch.Tensor) -> Callable:
            model = copy.deepcopy(model).to(device).eval()
            return channels_last_forward(model) if form == "nhwc" else model
        return forward_of

    forms = ("nchw", "nhwc") if layout == "fastest" else (layout,)
    timed = {form: side_by_side_ms(models, input_shape, batch_size, device, min_run_time,
                                   threads, forward_in(form)) for form in forms}
    if layout != "fastest":
        return {**timed[layout], "layout": layout}
    results, layouts = fastest_variant(timed)
    return {**results, "layout": layout, "layouts": layouts}


def fastest_variant(timed: dict[str, dict]) -> tuple[dict, dict]:
    """``timed``: variant → :func:`side_by_side_ms` of the same models in that variant. Each
    model's time in its fastest variant at each batch size (in side_by_side_ms's form), and
    which variant that was: ``{batch_1: {name: variant}, batch_N: {...}}``. What a deployment
    would pick, for the dense and the compressed model alike."""
    results = dict(next(iter(timed.values())))
    chosen = {}
    for key in ("batch_1", "batch_N"):
        chosen[key] = {name: min(timed, key=lambda variant: timed[variant][key][name])
                       for name in results[key]}
        results[key] = {name: timed[variant][key][name] for name, variant in chosen[key].items()}
    return results, chosen


# The deployment forms a run can time besides eager PyTorch (bench.<form>=true): the
# results.json keys latency_ms.<form> and efficiency_<form>.
DEPLOYED_FORMS = {"onnxruntime": "exported to ONNX, under ONNX Runtime's CPU provider",
                  "inductor": "compiled by TorchInductor, weights frozen, convs on oneDNN or "
                              "PyTorch's dispatch, whichever is faster"}


def deployed_latency(form: str, models: dict[str, nn.Module], input_shape: tuple[int, ...],
                     batch_size: int, min_run_time: float, threads: int) -> dict | None:
    """:func:`side_by_side_ms` of the models in a deployment form (a key of
    ``DEPLOYED_FORMS``) on the CPU: ``onnxruntime``, the form in which compression paid most
    in eager-timed choices, or ``inductor``, PyTorch 2's own compiler, in which factorized
    and pruned layers realise more of their MAC savings at batch 32 than eagerly
    (docs/performance.md). Each model is traced at the batch size it is timed at (a traced
    module may fix it), with ``threads`` (Inductor builds its kernels for a thread count).
    Compiled, each model is timed with its convs on oneDNN and on PyTorch's own dispatch
    (:func:`~compaware.export.inductor_convs`), and keeps the faster at each batch size,
    recorded under ``convs``: small convs at batch 1 run faster without oneDNN's per-call
    set-up, large ones and batch 32 with it.
    None, with a warning, where the form is unavailable (onnxruntime not installed, a model
    that cannot be exported or compiled): the run's other results stand."""
    def compiled_with(convs: str) -> Callable:
        def forward_of(name: str, model: nn.Module, batch: torch.Tensor) -> Callable:
            with torch_threads(threads):
                return compile_inductor(model, batch, convs)
        return forward_of

    with tempfile.TemporaryDirectory() as tmp:
        def in_onnxruntime(name: str, model: nn.Module, batch: torch.Tensor) -> Callable:
            return onnxruntime_forward(model, batch, Path(tmp) / f"{name}_{len(batch)}.onnx",
                                       threads)

        def timed(forward_of: Callable) -> dict:
            return side_by_side_ms(models, input_shape, batch_size, torch.device("cpu"),
                                   min_run_time, threads, forward_of)

        try:
            if form == "onnxruntime":
                return timed(in_onnxruntime)
            results, convs = fastest_variant({convs: timed(compiled_with(convs))
                                              for convs in inductor_convs()})
            return {**results, "convs": convs}
        except UserError as e:
            log.warning("bench.%s=true, but there is no latency %s: %s", form,
                        DEPLOYED_FORMS[form], e)
            return None


def compression_rates(dense: nn.Module, compressed: nn.Module, stored_bytes: int) -> dict:
    """The rates of docs/methods.md that do not need a clock: ``params_ratio`` = dense parameters /
    non-zero parameters of the compressed model (Han 2015; ``nonzero_params``, the report's
    non-zero ratio, not its structural params ratio), ``nonzero_fraction`` = its
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
            run_dir: Path) -> dict:
    """Parameters, MACs, bytes of the standalone file ``model_<name>.pt2`` (written to
    ``run_dir``), layer shapes and latency of each model, and the realization efficiency
    (:func:`efficiency`, on the CPU; ``efficiency_<form>`` in each deployment form asked for,
    ``bench.onnxruntime=true`` or ``bench.inductor=true``), as the results.json sections.

    Parameters, MACs and shapes are those of the models as trained; the standalone files and
    the latencies are those of their :func:`inference_model`, dense and compressed alike."""
    costs: dict = {key: {} for key in ("params", "macs", "bytes", "structure")}
    inference = {}
    for name, model in models.items():
        costs["params"][name] = count_params(model)
        costs["macs"][name] = count_macs(model, input_shape)
        inference[name] = inference_model(model)
        costs["bytes"][name] = export_model(inference[name], torch.zeros(2, *input_shape),
                                            run_dir / f"model_{name}.pt2")
        costs["structure"][name] = layer_shapes(model)
    threads = cfg.threads or torch.get_num_threads()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    costs["latency_ms"] = {"cpu": None, "cuda": None} | dict.fromkeys(DEPLOYED_FORMS)
    if cfg.latency:
        for device in devices:
            costs["latency_ms"][device.type] = compare_latency(
                inference, input_shape, cfg.batch_size, device, cfg.min_run_time, threads,
                cfg.layout if device.type == "cpu" else "nchw")
        for form in DEPLOYED_FORMS:
            if getattr(cfg, form):
                costs["latency_ms"][form] = deployed_latency(
                    form, inference, input_shape, cfg.batch_size, cfg.min_run_time, threads)
    costs["efficiency"] = efficiency(costs["macs"], costs["latency_ms"]["cpu"])
    for form in DEPLOYED_FORMS:
        costs[f"efficiency_{form}"] = efficiency(costs["macs"], costs["latency_ms"][form])
    return costs
