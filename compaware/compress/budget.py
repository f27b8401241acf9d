"""Compression to a budget: ``compress.target=params:0.1 | macs:0.25 | latency:0.5 | …``.

The target is the share of the dense model's cost that the compressed model keeps, in one
of four measures: ``params``, the structural parameter count (results.json ``params``);
``macs``, the multiply-accumulates of one forward pass of one sample
(:func:`compaware.costs.count_macs`, results.json ``macs``); ``bytes``, four bytes
(float32) per parameter; ``latency``, the time of a forward pass as measured
(:mod:`~compaware.compress.latency_budget`, which plans with measured prices and checks
the result against the clock). A compressor given a target chooses its per-layer ranks or
widths across all its layers at once (:mod:`~compaware.compress.svd`,
:mod:`~compaware.compress.prune`), then measures what it reached and reports both under
``budget`` (:meth:`Budget.outcome`).

Planning is analytic: what a layer costs follows from its shape (:func:`layer_cost`) and,
for MACs, from how many output positions it computes per sample (:func:`prices`, one
forward pass), so a compressor weighs thousands of candidate steps without building a
model for each. The measure of the result is not: :meth:`Budget.measure` counts the model
(a latency budget's result is timed instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from compaware.config import UserError
from compaware.costs import count_macs, count_params
from compaware.layers import eval_mode, weight_layers

KINDS = ("params", "macs", "bytes", "latency")
MAX_LAYER_CUT = 0.9  # compress.max_layer_cut's default: every layer keeps at least a tenth
TOLERANCE = 0.03  # a budget counts as reached up to 3 % above the target
BYTES_PER_PARAM = 4  # float32


@dataclass(frozen=True)
class Prices:
    """What one weight entry of each conv/linear (``weight``, by layer name) and one other
    parameter (a bias, a BatchNorm scale or shift: ``other``) cost in a budget's measure."""

    weight: dict[str, int]
    other: int


@dataclass(frozen=True)
class Budget:
    """``kind`` (one of :data:`KINDS`) and ``share`` in (0, 1] of the dense model's cost."""

    kind: str
    share: float

    def measure(self, model: nn.Module, input_shape: tuple[int, ...] | None) -> int:
        """The cost of ``model`` in this budget's measure."""
        if self.kind == "macs":
            return count_macs(model, input_shape)
        return count_params(model) * (BYTES_PER_PARAM if self.kind == "bytes" else 1)

    def judge(self, model: nn.Module, input_shape: tuple[int, ...] | None, dense: int,
              report: dict, *, kept: str, floor: str) -> dict:
        """The report's ``budget`` entry for the finished ``model``: why it was not reached,
        where not, is the layers a latency-aware compressor left as they were (``kept``:
        how, e.g. "dense") although the plan changed them, as ``report`` notes, else
        ``floor``, why the plan itself could go no further."""
        refused = [name for name, entry in report.items()
                   if entry.get("reason") == "not faster when timed"]
        why_not = (f"latency_aware kept {', '.join(refused)} {kept} (not faster when timed); "
                   f"the other layers were planned with them changed") if refused else floor
        return self.outcome(dense, self.measure(model, input_shape), why_not)

    def outcome(self, dense: int, compressed: int, why_not: str) -> dict:
        """The report's ``budget`` entry: asked, achieved (``compressed`` / ``dense``), whether
        that is within :data:`TOLERANCE` of the target and, where not, ``why_not``."""
        achieved = compressed / dense
        entry = {"kind": self.kind, "target": self.share, "achieved": round(achieved, 4),
                 "reached": achieved <= self.share * (1 + TOLERANCE)}
        if not entry["reached"]:
            entry["reason"] = why_not
        return entry


def slack(goal: float) -> float:
    """How far below ``goal`` a plan may go for a closer fit: half the tolerance, so that
    the coarse steps (a residual channel of ResNet's first stage, say) give way to finer
    ones."""
    return TOLERANCE / 2 * goal


def parse_target(spec: str | None, input_shape: tuple[int, ...] | None) -> Budget | None:
    """``compress.target`` as a :class:`Budget` (None for ``null``), or a :class:`UserError`
    naming what it takes. ``macs`` needs ``input_shape`` to count a forward pass."""
    if spec is None:
        return None
    kind, colon, share = str(spec).partition(":")
    try:
        value = float(share)
    except ValueError:
        value = math.nan
    if not colon or kind not in KINDS or not 0 < value <= 1:  # NaN fails the range too
        raise UserError(f"compress.target={spec!r} is not a budget; compress.target takes "
                        f"kind:share with kind one of {', '.join(KINDS)} and share in (0, 1], "
                        f"the part of the dense model's cost that remains (macs:0.25 keeps a "
                        f"quarter of the MACs, latency:0.5 half the measured time), or null "
                        f"for the per-layer options.")
    if kind in ("macs", "latency") and not input_shape:
        what = "counts the MACs of" if kind == "macs" else "times"
        raise UserError(f"compress.target={spec} {what} a forward pass, so it needs "
                        f"compress.input_shape (C, H, W of one sample; the configs take it "
                        f"from the data).")
    return Budget(kind, value)


def check_max_layer_cut(value: object, budget: Budget | None) -> float:
    """``compress.max_layer_cut`` as a float, or a :class:`UserError` saying what it takes;
    set away from its default without a target (which alone reads it), it is refused rather
    than ignored."""
    meaning = (f"compress.max_layer_cut takes a number in [0, 1]: the most of one layer's units "
               f"(prune) or rank (svd) that a compress.target plan may remove, so that no "
               f"layer is cut down to a bottleneck (default {MAX_LAYER_CUT}: every layer keeps "
               f"at least a tenth; 1: no floor, down to one unit or rank)")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not 0 <= value <= 1:  # NaN fails the range too
        raise UserError(f"compress.max_layer_cut={value!r} is not a share of a layer; "
                        f"{meaning}.")
    if budget is None and value != MAX_LAYER_CUT:
        raise UserError(f"compress.max_layer_cut={value} would be ignored: only a budget "
                        f"(compress.target) plans layer sizes. {meaning}; set "
                        f"compress.target, or leave compress.max_layer_cut at "
                        f"{MAX_LAYER_CUT}.")
    return float(value)


def layer_floor(units: int, live: int, max_cut: float) -> int:
    """The fewest units (or the lowest rank) a budget's plan may leave a layer of ``units``,
    ``live`` of them nonzero: at most ``max_cut`` of them go (``compress.max_layer_cut``,
    like Torch-Pruning's ``max_pruning_ratio``), but dead ones (zero units, zero singular
    values) always may, since keeping them keeps nothing; never below 1."""
    kept = math.ceil(round((1 - max_cut) * units, 9))  # round: 0.1 × 50 is 5, not 5.000…1
    return max(1, min(kept, live))


def floor_reason(at_floor: list[str], max_cut: float, what: str, otherwise: str) -> str:
    """Why a plan fell short: the layers held at their floor (:func:`layer_floor`) by
    ``compress.max_layer_cut``, where any were, else ``otherwise``."""
    if not at_floor:
        return otherwise
    kept = f"{(1 - max_cut) * 100:.3g} %"
    return (f"compress.max_layer_cut={max_cut:g} keeps at least {kept} of each layer's "
            f"{what}, and {', '.join(at_floor)} are at that floor; raise it (1: no floor), "
            f"select more layers or ask for less")


def check_alone(budget: Budget | None, option: str, value: object, default: object) -> None:
    """A target chooses every layer's size itself: refuse a per-layer ``option`` set away
    from its ``default`` beside it, rather than silently ignore one of the two."""
    if budget is not None and value != default:
        raise UserError(f"compress.target={budget.kind}:{budget.share:g} chooses every layer's "
                        f"size itself, so compress.{option}={value} would be ignored. To size "
                        f"the layers by compress.{option}, add compress.target=null (compress=svd "
                        f"has a target by default); to keep the target, leave compress.{option} "
                        f"at {'null' if default is None else default}.")


@torch.no_grad()
def prices(budget: Budget, model: nn.Module, input_shape: tuple[int, ...] | None) -> Prices:
    """What a weight and another parameter of ``model`` cost in ``budget``'s measure. A
    weight entry costs one MAC per output position its layer computes for one sample
    (counted over one forward pass; 0 for a layer it does not call); biases and BatchNorms
    cost no MACs (the flop counter counts none)."""
    layers = weight_layers(model)
    if budget.kind != "macs":
        each = BYTES_PER_PARAM if budget.kind == "bytes" else 1
        return Prices({name: each for name, _ in layers}, each)
    positions = dict.fromkeys((name for name, _ in layers), 0)

    def record(name: str, layer: nn.Module):
        def hook(_: nn.Module, __: tuple, out: torch.Tensor) -> None:
            positions[name] += out.numel() // layer.weight.shape[0]
        return hook

    hooks = [layer.register_forward_hook(record(name, layer)) for name, layer in layers]
    param = next(model.parameters())
    try:
        with eval_mode(model):
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return Prices(positions, 0)


def layer_cost(layer: nn.Module, price: Prices, name: str, removed: tuple[int, int] = (0, 0)
               ) -> int:
    """The cost of ``layer`` (a conv, linear or affine BatchNorm) with ``removed`` = (output
    units, input units) taken away. A depthwise conv's inputs are its outputs: it loses
    the larger of the two."""
    out_removed, in_removed = removed
    if isinstance(layer, _BatchNorm):
        return 2 * (layer.num_features - out_removed) * price.other
    shape = list(layer.weight.shape)  # out × in/groups × kernel…
    if getattr(layer, "groups", 1) > 1:  # depthwise (prune.blocking_layer keeps other groups)
        shape[0] -= max(out_removed, in_removed)
    else:
        shape[0] -= out_removed
        shape[1] -= in_removed
    biases = shape[0] if layer.bias is not None else 0
    return math.prod(shape) * price.weight.get(name, 0) + biases * price.other
