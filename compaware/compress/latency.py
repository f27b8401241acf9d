"""Latency-aware compression (``compress.latency_aware=true``) and hardware-friendly sizes.

Fewer MACs is not always less time: a rank-r pair of convs runs two kernels and writes an
intermediate activation, a pruned layer of 37 channels misses the vector width its GEMM is
tiled for. So a latency-aware compressor times each candidate change of a layer on the
device the model is on, at the layer's real input shape, and keeps the change only where
the layer (for pruning: every layer the change touches) gets faster, timing candidate and
original in alternating rounds. The layers are timed in the form the model will run in
(``compress.latency_form``): eager PyTorch (``eager``, NCHW, what a run's benchmark times by
default; ``channels_last``, NHWC, for ``bench.layout=nhwc``), exported to ONNX and run by
ONNX Runtime (``onnxruntime``), or compiled by TorchInductor (``inductor``, as
``bench.inductor=true`` times the model). Each favours other shapes: choices timed in eager
PyTorch cost ResNet-50's SVD 2.47× → 2.36× at batch 32 under ONNX Runtime
(docs/performance.md).

:class:`LayerTimer` measures with ``torch.utils.benchmark``; a compressor holds one in its
``timer`` attribute, which tests replace by a fake to check the decisions without a clock.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Size, nn

from compaware.bench import channels_last_forward, median_ms
from compaware.config import UserError, check_range
from compaware.export import compile_inductor, onnxruntime_forward
from compaware.layers import eval_mode

Timer = Callable[[nn.Module, torch.Tensor], float]


def round_up(size: int, multiple: int, limit: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``, at most ``limit``: ranks and channel
    counts that fill the vector units (a GEMM tiled by 8 or 16 wastes the rest of a tile)."""
    return min(-(-size // multiple) * multiple, limit)


LATENCY_FORMS = ("eager", "channels_last", "onnxruntime", "inductor")


class LayerTimer:
    """Median seconds of one inference forward pass of a layer (``torch.utils.benchmark``),
    in ``form``: ``eager`` (the module in eval mode), ``channels_last`` (a copy in NHWC,
    :func:`compaware.bench.channels_last_forward`), ``onnxruntime`` (the module exported to
    ONNX, run by ONNX Runtime's CPU provider) or ``inductor`` (compiled by TorchInductor,
    :func:`compaware.export.compile_inductor`, on an NHWC input: the layout Inductor keeps
    between the convs of a compiled network, so a layer is not charged for converting to it).
    A deployed layer is built once per weight and input shape and kept while the layer lives:
    a compilation takes seconds."""

    def __init__(self, form: str = "eager", min_run_time: float = 0.05) -> None:
        self.form, self.min_run_time = form, min_run_time
        self.deployed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @torch.inference_mode()
    def __call__(self, layer: nn.Module, x: torch.Tensor) -> float:
        layer.eval()
        if self.form == "inductor" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        forward = (layer if self.form == "eager" else
                   channels_last_forward(layer) if self.form == "channels_last" else
                   self.deployed_forward(layer, x))
        return median_ms(forward, x, self.min_run_time, torch.get_num_threads()) / 1e3

    def deployed_forward(self, layer: nn.Module, x: torch.Tensor) -> Callable:
        """``layer`` in the deployment form, built anew only when its shapes changed (a
        pruned layer is narrowed in place between two timings)."""
        shapes = (tuple(x.shape), *(tuple(p.shape) for p in layer.parameters()))
        cached = self.deployed.get(layer)
        if cached is None or cached[0] != shapes:
            cached = self.deployed[layer] = (shapes, self.deploy(layer, x))
        return cached[1]

    def deploy(self, layer: nn.Module, x: torch.Tensor) -> Callable:
        """``layer`` compiled by TorchInductor or exported to an ONNX Runtime session."""
        if self.form == "inductor":
            return compile_inductor(layer, x)
        with tempfile.TemporaryDirectory() as folder:  # the session holds the model
            return onnxruntime_forward(layer, x, Path(folder) / "layer.onnx",
                                       torch.get_num_threads())


def input_shapes(model: nn.Module, input_shape: tuple[int, ...],
                 batch_size: int) -> dict[str, Size]:
    """The input shape of every submodule of ``model`` in one eval-mode forward pass of a
    batch of ``batch_size`` samples of ``input_shape``: what each layer is timed on."""
    shapes: dict[str, Size] = {}

    def record(name: str) -> Callable:
        def hook(_: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, args[0].shape)
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in model.named_modules() if name]
    param = next(model.parameters())
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(batch_size, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


class LatencyCheck:
    """Times conv and linear layers of ``model`` on their own input shape, a candidate
    replacement against what it replaces in alternating rounds."""

    rounds = 3  # a burst of load on a shared machine then hits both sides, not one

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                 timer: Timer) -> None:
        self.shapes = input_shapes(model, input_shape, batch_size)
        self.timer = timer
        self.device = next(model.parameters()).device

    def input_of(self, name: str, layer: nn.Module) -> list[int]:
        """The input shape of layer ``name``, with as many channels (features) as ``layer``
        reads now: an earlier pruning step may have narrowed it."""
        shape = list(self.shapes[name])
        if isinstance(layer, nn.Linear):
            shape[-1] = layer.in_features
        else:
            shape[1] = layer.in_channels
        return shape

    def compare(self, before: list[tuple[nn.Module, list[int]]],
                after: list[tuple[nn.Module, list[int]]]) -> tuple[float, float]:
        """Seconds of the layers ``before`` and of their replacements ``after`` (each a layer
        and its input shape), summed per side: the median of :attr:`rounds` rounds that time
        one side, then the other."""
        inputs = [[(layer, torch.randn(shape, device=self.device)) for layer, shape in side]
                  for side in (before, after)]
        rounds = [[sum(self.timer(layer, x) for layer, x in side) for side in inputs]
                  for _ in range(self.rounds)]
        before_s, after_s = (statistics.median(times) for times in zip(*rounds, strict=True))
        return before_s, after_s

    def keeps(self, name: str, layer: nn.Module, replacement: nn.Module, entry: dict,
              flag: str, label: str) -> bool:
        """Whether ``replacement`` of layer ``name`` is faster than ``layer``, timed on the
        layer's input. Notes both times in the layer's report ``entry`` (``latency_ms``: the
        replacement's under ``label``) and, where it is not faster, sets ``entry[flag]`` to
        False with the reason."""
        shape = self.input_of(name, layer)
        before, after = self.compare([(layer, shape)], [(replacement, shape)])
        entry["latency_ms"] = {"layer": before * 1e3, label: after * 1e3}
        if after >= before:
            entry.update({flag: False, "reason": "not faster when timed"})
        return after < before


class LatencyOptions:
    """The options a latency-aware compressor shares: ``round_to`` (ranks or channel counts
    rounded up to a multiple of it; 1: not rounded), ``latency_aware``, ``latency_batch``
    (the batch size the layers are timed at) and ``latency_form`` (what they are timed in:
    one of :data:`LATENCY_FORMS`), checked once here."""

    def __init__(self, round_to: int, latency_aware: bool, latency_batch: int,
                 input_shape: tuple[int, ...] | None,
                 latency_form: str = "eager") -> None:
        check_range("compress.round_to", round_to, 1, integer=True)
        check_range("compress.latency_batch", latency_batch, 1, integer=True)
        if latency_form not in LATENCY_FORMS:
            raise UserError(f"compress.latency_form={latency_form!r} is not a form compaware "
                            f"can time layers in; compress.latency_form takes one of "
                            f"{', '.join(LATENCY_FORMS)} (eager PyTorch in NCHW or NHWC, "
                            f"exported to ONNX and run by ONNX Runtime, or compiled by "
                            f"TorchInductor).")
        if latency_aware and not input_shape:
            raise UserError("compress.latency_aware=true times each layer on its input, so it "
                            "needs compress.input_shape (C, H, W of one sample; the configs "
                            "take it from the data).")
        missing = [package for package in ("onnx", "onnxruntime")
                   if latency_aware and latency_form == "onnxruntime"
                   and importlib.util.find_spec(package) is None]
        if missing:
            raise UserError(f"compress.latency_form=onnxruntime times layers exported to ONNX "
                            f"under ONNX Runtime, and {' and '.join(missing)} is not "
                            f"installed: pip install 'compaware[onnx]', or set "
                            f"compress.latency_form=eager.")
        self.round_to, self.latency_aware = int(round_to), bool(latency_aware)
        self.latency_batch = int(latency_batch)
        self.timer: Timer = LayerTimer(latency_form)  # tests put a fake clock here

    def latency_check(self, model: nn.Module, input_shape: tuple[int, ...]) -> LatencyCheck | None:
        """A :class:`LatencyCheck` on ``model`` when latency-aware, else None."""
        if not self.latency_aware:
            return None
        return LatencyCheck(model, input_shape, self.latency_batch, self.timer)
