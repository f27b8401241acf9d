"""Compression to a measured latency budget: ``compress.target=latency:<share>``.

The share is the compressed model's measured time over the dense model's, both timed whole
in ``compress.latency_form`` at ``compress.latency_batch`` samples by the compressor's
:data:`~compaware.compress.latency.Timer` (a ``LayerTimer`` times a model as the benchmark
runs it: BatchNorms folded). Planning goes as for MACs, with measured prices instead of
counted ones: each candidate layer is timed alone on its input, dense and at a few of the
sizes the plan can give it (ranks, or widths, rounded to ``round_to``), and a size between
those is priced by linear interpolation (:class:`Curve`). What the layers do not account
for (activations, additions, pooling) is the dense model's measured time less the sum of
its layers': fixed for SVD (a pair writes the layer's outputs), shrinking with the channels
for pruning (:func:`~compaware.compress.prune_plan.timed_cost`). A layer of one shape on one
input is timed once (:class:`ShapeCache`): ResNet-50's blocks repeat.

A plan is a prediction, so it is checked (:func:`meet`): the compressed model is timed
against the dense one, side by side in alternating rounds. Where it is slower than the target
allows, or more than :data:`CLOSE` faster (the parts taken as fixed shrink with the layers
too, and small layers timed alone cost more than inside the model, so a pruned model often
runs several times faster than planned), the plan is made again, at most :data:`PLANS`
times, searching the share a plan aims at (:func:`next_aim`) inside the bracket the plans
measured so far leave.
The ``budget`` entry records the target, the measured share, the spread of the
per-round shares, the plan's own prediction and how many plans it took.

Every timing goes through the timer in a fixed order, so that a resumed run replays them
(:mod:`~compaware.compress.replay`) and rebuilds the same architecture.
"""

from __future__ import annotations

import bisect
import copy
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter

import torch
from torch import nn

from compaware.compress.budget import TOLERANCE, Budget
from compaware.compress.latency import LatencyCheck, Timer

log = logging.getLogger(__name__)

PLANS = 5  # plans made at most: a search over the aim, which a prediction may miss 10×
INSIDE = 0.1  # an interpolated aim keeps this share of its bracket from either end
CLOSE = 0.1  # a plan measured up to this share faster than the target is not made again
ROUNDS = 5  # alternating rounds of dense and compressed when the whole models are timed

Plan = Callable[[nn.Module, Budget, "Measured"], tuple[nn.Module, dict]]


class ShapeCache:
    """Seconds of a layer on an input of a given shape, asked of ``timer`` once per layer
    (its kind, shapes and hyperparameters: its ``repr``) and input shape."""

    def __init__(self, check: LatencyCheck) -> None:
        self.check = check
        self.seconds_of: dict[tuple, float] = {}

    def __call__(self, layer: nn.Module, shape: list[int]) -> float:
        key = (repr(layer), tuple(shape))
        if key not in self.seconds_of:
            x = torch.randn(shape, device=self.check.device)
            self.seconds_of[key] = float(self.check.timer(layer, x))
        return self.seconds_of[key]


@dataclass(frozen=True)
class Measured:
    """What a plan for a latency budget prices with: the layers' timings (``cache``) and the
    dense model's time; costs in :func:`nanoseconds`."""

    cache: ShapeCache
    dense_seconds: float

    @property
    def dense(self) -> int:
        return nanoseconds(self.dense_seconds)


class Curve:
    """A layer's measured seconds at a few sizes, linearly interpolated in between and held
    at the nearest measured size beyond them."""

    def __init__(self, points: dict[float, float]) -> None:
        self.sizes = sorted(points)
        self.seconds = [points[size] for size in self.sizes]

    def __call__(self, size: float) -> float:
        i = bisect.bisect_left(self.sizes, size)
        if i == 0:
            return self.seconds[0]
        if i == len(self.sizes):
            return self.seconds[-1]
        low, high = self.sizes[i - 1], self.sizes[i]
        t = (size - low) / (high - low)
        return self.seconds[i - 1] + t * (self.seconds[i] - self.seconds[i - 1])


def nanoseconds(seconds: float) -> int:
    """The allocators' integer cost unit."""
    return round(seconds * 1e9)


def samples(sizes: list[int]) -> list[int]:
    """A few of ``sizes`` (largest first) to time: the first, the last, and two between."""
    if not sizes:
        return []
    picked = {sizes[0], sizes[len(sizes) // 2], sizes[3 * len(sizes) // 4], sizes[-1]}
    return sorted(picked, reverse=True)


def side_by_side(timer: Timer, dense: nn.Module, compressed: nn.Module,
                 x: torch.Tensor) -> tuple[float, float]:
    """The compressed model's time over the dense one's: the median over :data:`ROUNDS`
    rounds that time one, then the other (a burst of load hits both), and half the range of
    the per-round shares, the noise it is measured with."""
    shares = []
    for _ in range(ROUNDS):
        before = timer(dense, x)
        shares.append(timer(compressed, x) / before)
    return statistics.median(shares), (max(shares) - min(shares)) / 2


def next_aim(tried: list[tuple[float, float]], target: float, planned: float) -> float:
    """The share the next plan aims at, given the (measured share, aim) of the plans so far
    and what the last one predicted (``planned``): between the closest aims measured on
    either side of the target, linearly interpolated; with plans on one side only, the target
    corrected by how far the last prediction was off. Either way the aim stays inside the
    bracket the plans so far leave (the dense model counts as a plan measured at 1.0 for an
    aim of 1.0), :data:`INSIDE` of it from its ends: a prediction off by 10× cannot send the
    next plan past one already measured, and a curved relation still shrinks the bracket from
    both sides (a secant alone creeps from one)."""
    faster = [point for point in tried if point[0] < target]
    slower = [point for point in tried if point[0] > target]
    if faster and slower:  # by aim: noise can order the measured shares otherwise
        (low, low_aim), (high, high_aim) = (max(faster, key=itemgetter(1)),
                                            min(slower, key=itemgetter(1)))
        aim = low_aim + (target - low) * (high_aim - low_aim) / (high - low)
    else:
        aim = target * planned / tried[-1][0]
    floor = max((aimed for _, aimed in faster), default=0.0)
    ceiling = min(aimed for _, aimed in [*slower, (1.0, 1.0)])
    margin = INSIDE * (ceiling - floor)
    return min(max(aim, floor + margin), ceiling - margin)


def preferred(achieved: float, best: float, limit: float) -> bool:
    """Whether a plan measured at ``achieved`` beats the best so far: one that reaches the
    target (at most ``limit``) beats one that does not; of two that reach it the less
    compressed, of two that do not the faster."""
    if (achieved <= limit) != (best <= limit):
        return achieved <= limit
    return achieved > best if achieved <= limit else achieved < best


def meet(model: nn.Module, budget: Budget, plan: Plan, *, timer: Timer, batch_size: int,
         input_shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
    """``model`` compressed by ``plan(copy, aim, measured)`` (a compressor's plan for a
    latency :class:`Budget` ``aim``, priced by :class:`Measured` timings) until
    the measured share is between (1 - :data:`CLOSE`) and (1 + :data:`TOLERANCE`) times
    ``budget``'s, at most :data:`PLANS` times; the report of the plan kept, its ``budget``
    entry measured. Kept: of the plans that reach the target the least compressed, else the
    fastest. Everything is timed by ``timer`` at ``batch_size`` samples of ``input_shape``."""
    param = next(model.parameters())
    x = torch.randn(batch_size, *input_shape, device=param.device, dtype=param.dtype)
    cache = ShapeCache(LatencyCheck(model, input_shape, batch_size, timer))
    measured = Measured(cache, timer(model, x))
    target, limit = budget.share, budget.share * (1 + TOLERANCE)
    aim, best, plans, tried = target, None, 0, []
    while plans < PLANS:
        plans += 1
        compressed, report = plan(copy.deepcopy(model), Budget(budget.kind, aim), measured)
        achieved, spread = side_by_side(timer, model, compressed, x)
        log.info("latency budget %g, plan %d: aimed at %.3f, predicted %.3f, measured %.3f "
                 "± %.3f", target, plans, aim, report["budget"]["achieved"], achieved, spread)
        if best is None or preferred(achieved, best[2], limit):
            best = (compressed, report, achieved, spread)
        if target * (1 - CLOSE) <= achieved <= limit:
            break
        tried.append((achieved, aim))
        aim = next_aim(tried, target, report["budget"]["achieved"])
    compressed, report, achieved, spread = best
    planned = report.pop("budget")
    entry = {"kind": budget.kind, "target": budget.share, "achieved": round(achieved, 4),
             "spread": round(spread, 4), "planned": planned["achieved"], "plans": plans,
             "reached": achieved <= budget.share * (1 + TOLERANCE)}
    if not entry["reached"]:
        entry["reason"] = planned.get("reason") or (
            f"{plans} plans, each aimed between those measured before it, still "
            f"measured {achieved:.3f} of the dense model's time (±{spread:.3f} between "
            f"rounds)")
    report["budget"] = entry
    return compressed, report
