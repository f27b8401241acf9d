"""Pruning to a budget (``compress.target``): which units go, ranked over all groups at once.

Every unit of every coupled group gets an importance, its group norm over the mean of its
group's (:func:`importance`); each group offers steps down (:func:`group_steps`), and the
steps are taken in one ranking, least important first, until what they save
(:class:`RemovalPlan`) meets the budget (:func:`take_steps`). What a layer costs with units
removed is counted from its shape for params, MACs and bytes (:func:`analytic_cost`), or
measured for a latency budget (:func:`timed_cost`,
:mod:`~compaware.compress.latency_budget`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from compaware.compress.budget import Prices, layer_cost, layer_floor
from compaware.compress.latency import pruned_stand_in, round_up
from compaware.compress.latency_budget import Curve, Measured, nanoseconds
from compaware.layers import WEIGHT_LAYERS, weight_layers

# a layer's cost with (output units, input units) removed
LayerCost = Callable[[nn.Module, str, tuple[int, int]], int]


def zero_units(norms: Tensor | None, threshold: float) -> Tensor:
    """Which units have a norm ≤ ``threshold`` × the largest (none when ``norms`` is None)."""
    if norms is None:
        return torch.zeros(0, dtype=torch.bool)
    return norms <= threshold * norms.max()


def importance(writers: Tensor, readers: Tensor | None, threshold: float) -> Tensor:
    """Each unit's group norm over the mean of its group's (comparable across layers of any
    scale), -1 for the dead units (:func:`~compaware.compress.prune.units_to_remove`) so
    that they go first."""
    dead = zero_units(writers, threshold)
    if readers is not None:
        dead = dead | zero_units(readers, threshold)
    return torch.where(dead, -1.0, writers / writers.mean().clamp_min(1e-30))


def group_floor(unit_importance: Tensor, max_cut: float) -> int:
    """The fewest units a plan may leave the group (:func:`~.budget.layer_floor`: at most
    ``max_cut`` of them go, and the dead ones, importance -1, always may)."""
    return layer_floor(len(unit_importance), int((unit_importance >= 0).sum()), max_cut)


def group_steps(unit_importance: Tensor, round_to: int,
                least: int = 1) -> list[tuple[float, list[int]]]:
    """The group's steps down, in order: (importance, root units removed). The least
    important units go first; each step leaves a multiple of ``round_to`` units (the first
    may remove fewer than ``round_to``: the rounding comes first) and at least ``least``. A
    step is as important as its most important unit."""
    n = len(unit_importance)
    order = torch.argsort(unit_importance, stable=True).tolist()
    steps, kept = [], n
    for size in range((n - 1) // round_to * round_to, least - 1, -round_to):
        units = order[n - kept:n - size]
        steps.append((float(unit_importance[units].max()), units))
        kept = size
    return steps


def held(units: int, removed: int, round_to: int, least: int) -> bool:
    """Whether the floor ``least`` is all that keeps a group of ``units``, ``removed`` of them
    planned away, from its next step down."""
    kept = units - removed
    return kept > round_to and (kept - 1) // round_to * round_to < least


def unit_reach(graph: tp.DependencyGraph, group: tp.Group,
               names: dict[nn.Module, str]) -> dict[int, list[tuple[str, int, int]]]:
    """Per root unit of ``group``: the (layer, side, count) it takes away, side 0 for output
    units (a BatchNorm's channels too), 1 for inputs (a linear after a flatten loses
    ``count`` > 1 input columns per channel)."""
    reach: dict[int, list[tuple[str, int, int]]] = {}
    for item in group:
        layer = item.dep.layer
        if not isinstance(layer, (*WEIGHT_LAYERS, _BatchNorm)) or None in item.root_idxs:
            continue
        side = 0 if graph.is_out_channel_pruning_fn(item.dep.handler) else 1
        for unit, count in Counter(item.root_idxs).items():
            reach.setdefault(unit, []).append((names[layer], side, count))
    return reach


class RemovalPlan:
    """What removing units does to the cost of the model, counted layer by layer as units are
    taken away: ``cost(layer, name, removed)`` is what a layer costs with ``removed`` =
    (output units, input units) taken away (:func:`analytic_cost`, :func:`timed_cost`)."""

    def __init__(self, model: nn.Module, cost: LayerCost) -> None:
        self.layers = dict(model.named_modules())
        self.cost = cost
        self.removed: dict[str, list[int]] = {}

    def remove(self, reach: list[tuple[str, int, int]], sign: int = 1) -> int:
        """Take away one unit reaching ``reach`` (``sign=-1``: put it back); return the cost
        saved."""
        saved = 0
        for name, side, count in reach:
            layer, removed = self.layers[name], self.removed.setdefault(name, [0, 0])
            before = self.cost(layer, name, tuple(removed))
            removed[side] += sign * count
            saved += before - self.cost(layer, name, tuple(removed))
        return saved


Step = tuple[float, int, nn.Module, list[int], dict]  # importance, order, root, units, reach


def take_steps(steps: list[Step], removals: RemovalPlan, *, excess: float,
               margin: float) -> tuple[dict[nn.Module, list[int]], int]:
    """The root units to remove per group (keyed by its root layer) to save ``excess``, and
    the cost they save: the groups' steps in one ranking by importance, taken from the least
    important on until ``excess`` is saved (dead units go anyway). A step that would save
    more than ``margin`` too much ends its group's steps, so that finer ones fill the rest,
    unless nothing else gets close enough."""
    plan: dict[nn.Module, list[int]] = {}
    too_big: dict[nn.Module, tuple[int, list[int]]] = {}  # per ended group: its next step
    total = 0
    for value, _, root, units, reach in sorted(steps, key=lambda step: step[:2]):
        if excess <= 0 and value >= 0:
            break
        if root in too_big:
            continue
        saved = sum(removals.remove(reach.get(unit, [])) for unit in units)
        if saved - excess > margin and value >= 0:
            for unit in units:
                removals.remove(reach.get(unit, []), sign=-1)
            too_big[root] = (saved, units)
            continue
        excess, total = excess - saved, total + saved
        plan.setdefault(root, []).extend(units)
    if excess > margin and too_big:  # short of the budget: the smallest overshoot after all
        root, (saved, units) = min(too_big.items(), key=lambda item: item[1][0])
        plan.setdefault(root, []).extend(units)
        total += saved
    return plan, total


def analytic_cost(price: Prices) -> LayerCost:
    """A layer's cost counted from its shape (:func:`~compaware.compress.budget.layer_cost`)."""
    return lambda layer, name, removed: layer_cost(layer, price, name, removed)


FRACTIONS = (0.75, 0.5, 0.25, 0.1)  # of a layer's units, at which its time is measured


def timed_cost(model: nn.Module, measured: Measured, sides: dict[str, set[int]],
               positions: dict[str, int], round_to: int) -> LayerCost:
    """A layer's cost measured: each conv and linear that pruning reaches (``sides``: the
    sides it loses units on, 0 outputs, 1 inputs) timed dense and with :data:`FRACTIONS` of
    those units left (rounded up to ``round_to``), interpolated in its share of MACs left,
    plus its part of the rest of the model's time. The rest (activations, pooling, additions:
    the dense model's time less its layers') is shared among all convs and linears by the
    size of their outputs (``positions`` per output unit, :func:`~.budget.prices`) and
    shrinks with their output units: those passes read and write the channels a layer
    writes. BatchNorms cost nothing (a deployment folds them)."""
    curves = {}
    for name, axes in sides.items():
        layer = model.get_submodule(name)
        if isinstance(layer, WEIGHT_LAYERS):
            curves[name] = layer_curve(measured, (name, layer), axes, round_to)
    outputs = {name: positions[name] * layer.weight.shape[0]
               for name, layer in weight_layers(model)}
    rest = max(measured.dense_seconds - sum(curve(1.0) for curve in curves.values()), 0.0)
    per_output = rest / max(sum(outputs.values()), 1)

    def cost(layer: nn.Module, name: str, removed: tuple[int, int]) -> int:
        if name not in curves:
            return 0
        units = layer.weight.shape[0]
        left = units - (max(removed) if getattr(layer, "groups", 1) > 1 else removed[0])
        return nanoseconds(curves[name](macs_left(layer, name, removed))
                           + per_output * outputs[name] * left / units)
    return cost


def macs_left(layer: nn.Module, name: str, removed: tuple[int, int]) -> float:
    unit = Prices({name: 1}, 0)
    return layer_cost(layer, unit, name, removed) / layer_cost(layer, unit, name)


def layer_curve(measured: Measured, named: tuple[str, nn.Module], axes: set[int],
                round_to: int) -> Curve:
    """Seconds of layer ``named`` by the share of its MACs left, pruned on ``axes``."""
    name, layer = named
    check = measured.cache.check
    points = {1.0: measured.cache(layer, check.input_of(name, layer))}
    units = layer.weight.shape[:2]
    for fraction in FRACTIONS:
        removed = [n - round_up(math.ceil(n * fraction), round_to, n) if side in axes else 0
                   for side, n in enumerate(units)]
        if getattr(layer, "groups", 1) > 1:  # depthwise: its inputs are its outputs
            removed = [layer.weight.shape[0] - round_up(
                math.ceil(layer.weight.shape[0] * fraction), round_to, layer.weight.shape[0]), 0]
        if any(removed):
            points[macs_left(layer, name, tuple(removed))] = measured.cache(
                *pruned_stand_in(check, name, layer, tuple(removed)))
    return Curve(points)
