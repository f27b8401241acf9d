"""Latency-aware compression (``compress.latency_aware=true``) and hardware-friendly sizes.

Fewer MACs is not always less time: a rank-r pair of convs runs two kernels and writes an
intermediate activation, a pruned layer of 37 channels misses the vector width its GEMM is
tiled for. So a latency-aware compressor times each candidate change of a layer on the
device the model is on, at the layer's real input shape, and keeps the change only where
the layer (for pruning: every layer the change touches) gets faster, timing candidate and
original in alternating rounds. The layers are timed in the form the model will run in
(``compress.latency_form``, one of the layer forms of :mod:`compaware.deploy.forms`, the
vocabulary ``bench.forms`` uses): eager PyTorch (``eager``, NCHW, what a run's benchmark
times by default; ``channels_last``, NHWC), exported to ONNX and run by ONNX Runtime
(``onnxruntime``), or compiled by TorchInductor (``inductor``). Each favours other shapes:
choices timed in eager PyTorch cost ResNet-50's SVD 2.47× → 2.36× at batch 32 under ONNX
Runtime (docs/performance.md).

What times a layer (a :data:`Timer`) is handed to the compressor from outside
(``compressor(model, artifacts, timer)``): in a run a ``compaware.deploy.timing.LayerTimer``
in ``latency_form``; in tests a fake clock, to check the decisions without a clock; in a
resumed run the answers its compression got before (:mod:`compaware.compress.replay`). So
nothing here knows how a layer is deployed: the options only name the form.

Pruning's candidates are stand-ins (:func:`stand_in`): layers of the pruned widths with
random weights, timed against the layers of the group as they are
(:func:`faster_when_pruned`).
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Size, nn

from compaware.config import UserError, check_range
from compaware.deploy.forms import LAYER_FORMS
from compaware.layers import WEIGHT_LAYERS, eval_mode

if TYPE_CHECKING:
    import torch_pruning as tp

Timer = Callable[[nn.Module, torch.Tensor], float]  # seconds of a layer's forward on an input


def round_up(size: int, multiple: int, limit: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``, at most ``limit``: ranks and channel
    counts that fill the vector units (a GEMM tiled by 8 or 16 wastes the rest of a tile)."""
    return min(-(-size // multiple) * multiple, limit)


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

    def keeps(self, name: str, layer: nn.Module, replacement: nn.Module, *, entry: dict,
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
    one of :data:`LAYER_FORMS`), checked once here. A compressor given a latency budget
    (``measured_budget``) times too, so it is latency-aware (it needs a timer) without
    checking each change on its own as ``latency_aware`` does (:attr:`check_layers`)."""

    def __init__(self, *, round_to: int = 1, latency_aware: bool = False,
                 latency_batch: int = 32, input_shape: tuple[int, ...] | None = None,
                 latency_form: str = "eager", measured_budget: bool = False) -> None:
        check_range("compress.round_to", round_to, 1, integer=True)
        check_range("compress.latency_batch", latency_batch, 1, integer=True)
        if latency_form not in LAYER_FORMS:
            raise UserError(f"compress.latency_form={latency_form!r} is not a form compaware "
                            f"can time layers in; compress.latency_form takes one of "
                            f"{', '.join(LAYER_FORMS)} (eager PyTorch in NCHW or NHWC, "
                            f"exported to ONNX and run by ONNX Runtime, or compiled by "
                            f"TorchInductor).")
        self.check_layers = bool(latency_aware)
        latency_aware = latency_aware or measured_budget
        if latency_aware and not input_shape:
            raise UserError("compress.latency_aware=true times each layer on its input, so it "
                            "needs compress.input_shape (C, H, W of one sample; the configs "
                            "take it from the data).")
        missing = [package for package in ("onnx", "onnxruntime")
                   if latency_aware and latency_form == "onnxruntime"
                   and importlib.util.find_spec(package) is None]
        if missing:  # refused at the start of a run, not when compression comes
            raise UserError(f"compress.latency_form=onnxruntime times layers exported to ONNX "
                            f"under ONNX Runtime, and {' and '.join(missing)} is not "
                            f"installed: pip install 'compaware[onnx]', or set "
                            f"compress.latency_form=eager.")
        self.round_to, self.latency_aware = int(round_to), bool(latency_aware)
        self.latency_batch, self.latency_form = int(latency_batch), latency_form

    def latency_check(self, model: nn.Module, input_shape: tuple[int, ...],
                      timer: Timer | None) -> LatencyCheck | None:
        """A :class:`LatencyCheck` on ``model`` timing with ``timer`` when latency-aware,
        else None."""
        if not self.check_layers:
            return None
        assert timer is not None, "Compressor.use_timer refuses a latency-aware call without one"
        return LatencyCheck(model, input_shape, self.latency_batch, timer)


def pruned_shapes(graph: tp.DependencyGraph, group: tp.Group, remove: list[int],
                  names: dict[nn.Module, str]) -> dict[str, list[int]]:
    """Per conv/linear of ``group``: how many output and input units removing the root units
    ``remove`` takes from it, as ``[out, in]``."""
    removed = set(remove)
    shapes: dict[str, list[int]] = {}
    for item in group:
        layer = item.dep.layer
        if not isinstance(layer, WEIGHT_LAYERS) or None in item.root_idxs:
            continue
        side = 0 if graph.is_out_channel_pruning_fn(item.dep.handler) else 1
        shapes.setdefault(names[layer], [0, 0])[side] += sum(r in removed
                                                             for r in item.root_idxs)
    return shapes


def stand_in(layer: nn.Module, out_removed: int, in_removed: int) -> nn.Module:
    """A layer of ``layer``'s kind and hyperparameters, ``out_removed`` outputs and
    ``in_removed`` inputs narrower (random weights: it is only timed)."""
    param = layer.weight
    if isinstance(layer, nn.Linear):
        smaller = nn.Linear(layer.in_features - in_removed, layer.out_features - out_removed,
                            bias=layer.bias is not None)
    else:
        depthwise = layer.groups > 1  # the only grouped convs pruned (prune.blocking_layer)
        width = layer.out_channels - max(out_removed, in_removed)
        smaller = type(layer)(width if depthwise else layer.in_channels - in_removed,
                              width if depthwise else layer.out_channels - out_removed,
                              layer.kernel_size, stride=layer.stride, padding=layer.padding,
                              dilation=layer.dilation, groups=width if depthwise else 1,
                              bias=layer.bias is not None, padding_mode=layer.padding_mode)
    return smaller.to(device=param.device, dtype=param.dtype)


def faster_when_pruned(check: LatencyCheck, model: nn.Module,
                       shapes: dict[str, list[int]]) -> tuple[float, float]:
    """Seconds of the group's convs and linears as they are and as pruned (``shapes``, from
    :func:`pruned_shapes`), each timed on its own input (narrower by the removed input
    units)."""
    before, after = [], []
    for name, removed in shapes.items():
        layer = model.get_submodule(name)
        before.append((layer, check.input_of(name, layer)))
        after.append(pruned_stand_in(check, name, layer, tuple(removed)))
    return check.compare(before, after)


def pruned_stand_in(check: LatencyCheck, name: str, layer: nn.Module,
                    removed: tuple[int, int]) -> tuple[nn.Module, list[int]]:
    """A :func:`stand_in` for layer ``name`` with ``removed`` = (outputs, inputs) taken away,
    and its input shape (narrower by the removed inputs)."""
    out_removed, in_removed = removed
    shape = check.input_of(name, layer)
    channel_dim = -1 if isinstance(layer, nn.Linear) else 1
    shape[channel_dim] -= (max(out_removed, in_removed) if getattr(layer, "groups", 1) > 1
                           else in_removed)
    return stand_in(layer, out_removed, in_removed), shape
