"""Latency-aware compression (``compress.latency_aware=true``) and hardware-friendly sizes.

Fewer MACs is not always less time: a rank-r pair of convs runs two kernels and writes an
intermediate activation, a pruned layer of 37 channels misses the vector width its GEMM is
tiled for. So a latency-aware compressor times each candidate change of a layer on the
device the model is on, at the layer's real input shape, and keeps the change only where
the layer (for pruning: every layer the change touches) gets faster, timing candidate and
original in alternating rounds.

:class:`LayerTimer` measures with ``torch.utils.benchmark``; a compressor holds one in its
``timer`` attribute, which tests replace by a fake to check the decisions without a clock.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import torch
from torch import Size, nn

from compaware.config import UserError, check_range
from compaware.layers import eval_mode

Timer = Callable[[nn.Module, torch.Tensor], float]


def round_up(size: int, multiple: int, limit: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``, at most ``limit``: ranks and channel
    counts that fill the vector units (a GEMM tiled by 8 or 16 wastes the rest of a tile)."""
    return min(-(-size // multiple) * multiple, limit)


class LayerTimer:
    """Median seconds of one eval-mode forward pass of a layer (``torch.utils.benchmark``)."""

    def __init__(self, min_run_time: float = 0.05) -> None:
        self.min_run_time = min_run_time

    @torch.inference_mode()
    def __call__(self, layer: nn.Module, x: torch.Tensor) -> float:
        # imported here: torch.utils.benchmark loads cpp_extension, which warns about CUDA_HOME
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        import torch.utils.benchmark as benchmark

        timer = benchmark.Timer(stmt="layer(x)", globals={"layer": layer.eval(), "x": x},
                                num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=self.min_run_time).median


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


class LatencyOptions:
    """The options a latency-aware compressor shares: ``round_to`` (ranks or channel counts
    rounded up to a multiple of it; 1: not rounded), ``latency_aware`` and ``latency_batch``
    (the batch size the layers are timed at), checked once here."""

    def __init__(self, round_to: int, latency_aware: bool, latency_batch: int,
                 input_shape: tuple[int, ...] | None) -> None:
        check_range("compress.round_to", round_to, 1, integer=True)
        check_range("compress.latency_batch", latency_batch, 1, integer=True)
        if latency_aware and not input_shape:
            raise UserError("compress.latency_aware=true times each layer on its input, so it "
                            "needs compress.input_shape (C, H, W of one sample; the configs "
                            "take it from the data).")
        self.round_to, self.latency_aware = int(round_to), bool(latency_aware)
        self.latency_batch = int(latency_batch)
        self.timer: Timer = LayerTimer()  # tests put a fake clock here

    def latency_check(self, model: nn.Module, input_shape: tuple[int, ...]) -> LatencyCheck | None:
        """A :class:`LatencyCheck` on ``model`` when latency-aware, else None."""
        if not self.latency_aware:
            return None
        return LatencyCheck(model, input_shape, self.latency_batch, self.timer)
