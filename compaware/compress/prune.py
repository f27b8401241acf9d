"""Structured pruning: whole units out, a physically smaller network back (``compress=prune``).

Which units go, per layer of n units: every unit whose group norm is at most ``threshold``
× the largest one (the zero groups that ``regularizer=sgl`` leaves), and at least
⌊``ratio``·n⌋ units, those with the smallest group norms (the post-hoc baseline after any
regularizer, ``none`` included).

What is tied to a unit comes from Torch-Pruning's ``DependencyGraph``, which traces the
model: the BatchNorm after it, the next layers' input channels or columns (through
pooling and flatten), the other layers that add into the same channel through residual
connections, and its position in concatenations. A unit is removed from all of them at
once, so the result is an ordinary network of narrower ``nn`` layers.

The group norm of a unit is the ℓ2 norm of everything that writes it, across the whole
coupled group: the weight rows and biases of every conv and linear producing that channel
and the scale and shift of every BatchNorm on it. When it is zero the channel is zero
everywhere (a zero filter with zero bias outputs 0, a BatchNorm with zero scale and shift
outputs 0, sums of zeros are 0, ReLU and pooling keep 0), so removing it leaves the
outputs unchanged. A zero filter followed by a BatchNorm with a non-zero shift is *not* a
zero unit (it outputs a constant): ``regularizer=sgl`` puts that BatchNorm in the unit's
group for this reason, and a residual channel goes only when every layer adding into it
has zeroed it.

With ``compress.target`` (:mod:`~compaware.compress.budget`), the units go in one ranking
over all groups instead (:func:`plan_removals`): the least important unit of the whole model
first, where a unit's importance is its group norm over the mean group norm of its group (so
that layers of any scale compare; dead units first), until the budget is met. How many units
each layer loses falls out of the ranking.

Never removed: the output layer's units (the classes), and the last unit of a layer
(width zero would cut the network; the largest unit stays and the log says so).

Left whole (see :func:`blocking_layer`): channels tied to a grouped or transposed conv, a
LayerNorm or GroupNorm, attention or a bare parameter; such models (ViT, ConvNeXt, ResNeXt,
RegNet) are pruned only where those are absent. A model Torch-Pruning cannot trace as a
whole (ShuffleNet's channel shuffle) is pruned part by part
(:func:`~compaware.compress.trace_parts.traced_parts`): inside the largest submodules that
trace alone, with the channels on their boundary kept; a model no part of which traces stops
with a message. The exactness argument assumes that the
functions between layers act on each channel alone and keep zero at zero (ReLU, pooling,
additions); Torch-Pruning sees a functional op only as its autograd nodes, so a
LocalResponseNorm, or a sigmoid gate on a channel before an addition, would pass the
checks and break exactness.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from compaware.compress.base import AccuracySearch, Compressor, Report
from compaware.compress.budget import (
    MAX_LAYER_CUT,
    Budget,
    check_alone,
    check_max_layer_cut,
    floor_reason,
    parse_target,
    prices,
    slack,
)
from compaware.compress.depth import remove_zero_branches
from compaware.compress.latency import (
    LatencyCheck,
    LatencyOptions,
    Timer,
    faster_when_pruned,
    pruned_shapes,
    round_up,
)
from compaware.compress.latency_budget import Measured, meet
from compaware.compress.prune_plan import (
    RemovalPlan,
    analytic_cost,
    group_floor,
    group_steps,
    held,
    importance,
    take_steps,
    timed_cost,
    unit_reach,
    zero_units,
)
from compaware.compress.shape import drop_dead_columns
from compaware.compress.svd import SVD, timed_budget
from compaware.compress.trace_parts import example_in_eval_mode, traced_parts
from compaware.config import UserError, check_range
from compaware.layers import WEIGHT_LAYERS, LayerSelection, weight_layers

log = logging.getLogger(__name__)

PRODUCERS = (_ConvNd, nn.Linear, _BatchNorm)  # layers whose parameters write a channel
NORMS_ACROSS_CHANNELS = (nn.LayerNorm, nn.GroupNorm)  # a zero channel changes the others


def check_still_runs(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """A last guard: a coupling Torch-Pruning got wrong shows as a failing forward."""
    with example_in_eval_mode(model, input_shape) as example:
        try:
            model(example)
        except Exception as e:
            raise UserError(f"compress: the pruned {type(model).__name__} no longer runs "
                            f"({type(e).__name__}: {e}): Torch-Pruning mishandles a coupling in "
                            f"this model. Prune fewer layers (compress.layers=conv|linear) or "
                            f"use compress=svd.") from None


def blocking_layer(group: tp.Group) -> nn.Module | None:
    """The first layer of ``group`` that keeps it from being pruned, or None.

    We prune only through layers whose channels are independent and that Torch-Pruning
    handles without model-specific settings: convs (plain or depthwise), linears, affine
    BatchNorms and parameter-free operations. Grouped convs, transposed convs, LayerNorm and
    GroupNorm (they normalise across channels, so even a zero channel matters), attention
    and bare parameters (a ViT's class token) block their group, which is left whole.
    """
    for item in group:
        layer = item.dep.layer
        if isinstance(layer, _ConvNd):
            depthwise = layer.groups == layer.in_channels == layer.out_channels
            supported = not layer.transposed and (layer.groups == 1 or depthwise)
        elif isinstance(layer, _BatchNorm):
            supported = layer.affine
        elif isinstance(layer, nn.Module):
            supported = isinstance(layer, nn.Linear) or (
                not isinstance(layer, NORMS_ACROSS_CHANNELS)
                and next(layer.parameters(), None) is None)
        else:  # an nn.Parameter used directly in forward
            supported = False
        if not supported:
            return layer
    return None


def unit_norms(graph: tp.DependencyGraph, group: tp.Group, side: str) -> Tensor | None:
    """The ℓ2 norm, per unit of the group's root layer, of every parameter that writes
    (``side="out"``: weight rows, biases, BatchNorm scale and shift) or reads (``side="in"``:
    the weight columns of every conv and linear taking the unit as input) that unit. None
    when nothing in the group is on that side."""
    squares = torch.zeros(len(group[0].idxs), dtype=torch.float64)
    found = False
    for item in group:
        layer = item.dep.layer
        if side == "out":
            on_side = (graph.is_out_channel_pruning_fn(item.dep.handler)
                       and isinstance(layer, PRODUCERS))
            params = (layer.weight, getattr(layer, "bias", None)) if on_side else ()
        else:
            on_side = (graph.is_in_channel_pruning_fn(item.dep.handler)
                       and isinstance(layer, WEIGHT_LAYERS))
            if on_side and getattr(layer, "groups", 1) > 1:
                return None  # a depthwise reader's columns are its filters: readers unknown
            params = (layer.weight.transpose(0, 1),) if on_side else ()
        if not on_side or None in item.root_idxs:
            continue
        found = True
        rows = torch.as_tensor(item.idxs)
        for p in params:
            if p is not None:
                part = p.detach()[rows.to(p.device)].reshape(len(rows), -1)
                squares.index_add_(0, torch.as_tensor(item.root_idxs),
                                   part.double().pow(2).sum(1).cpu())
    return squares.sqrt() if found else None


def units_to_remove(writers: Tensor, readers: Tensor | None, *, ratio: float,
                    threshold: float, round_to: int = 1) -> tuple[list[int], int]:
    """The units to remove (never all of them) and how many of them are dead.

    A unit is dead when everything writing it is zero (SGL's and SSL's filter groups), or
    when every layer reading it ignores it (SSL's channel groups: zero weight columns).
    Beyond the dead ones, the ``ratio`` share with the smallest writer norms goes too. The
    number kept is rounded up to a multiple of ``round_to`` (dead units are the last kept).
    """
    dead = zero_units(writers, threshold)
    if readers is not None:
        dead = dead | zero_units(readers, threshold)
    count = min(max(int(dead.sum()), int(ratio * len(writers))), len(writers) - 1)
    count = len(writers) - round_up(len(writers) - count, round_to, len(writers))
    # dead units first, then by writer norm
    order = torch.argsort(torch.where(dead, -1.0, writers.double()), stable=True)
    return sorted(order[:count].tolist()), int(dead.sum())


def prunable_groups(graph: tp.DependencyGraph, boundary: set[nn.Module],
                    ignored: list[nn.Module]) -> Iterator[tp.Group]:
    """The groups of ``graph`` rooted at a conv or linear not ``ignored``, less those that
    reach the part's ``boundary`` (its input or output channels: the rest of the model's).
    Torch-Pruning builds each group when asked, so pruning one before asking for the next
    is safe."""
    for group in graph.get_all_groups(ignored_layers=ignored + list(boundary),
                                      root_module_types=WEIGHT_LAYERS):
        if not any(item.dep.layer in boundary for item in group):
            yield group


# Why a budget is not reached when the plan itself can remove no unit more.
FLOOR = ("every selected layer is down to its last unit (or compress.round_to units) or left "
         "whole; select more layers or ask for less")


def units_per_layer(model: nn.Module) -> dict[str, int]:
    return {name: layer.weight.shape[0] for name, layer in weight_layers(model)}


class Prune(Compressor):
    """``compress=prune``: remove dead units, and the ``ratio`` smallest of every layer;
    with SSL's structures also zero residual branches (``depth``) and dead im2col columns
    (``shape``), so filter-, channel-, shape- and depth-wise sparsity all become real.

    ``threshold`` is relative to the largest group norm of the layer; ``input_shape`` (C, H, W)
    is one sample's shape, taken from the data, for tracing. ``layers``/``skip_first`` choose
    the layers whose units may go; the output layer's never do. ``depth``: first replace each
    residual block whose branch is exactly zero by its shortcut
    (:func:`~compaware.compress.depth.remove_zero_branches`). ``shape``: last, replace each
    layer with at least ``min_sparsity`` of its columns exactly zero by its live-column
    version (:func:`~compaware.compress.shape.drop_dead_columns`); the gather it needs costs
    time, so nearly dense layers stay as they are. ``round_to``: each layer keeps a multiple
    of this many units. ``latency_aware``: a group is pruned only where its convs and linears,
    timed at ``latency_batch`` samples in ``latency_form``, get faster
    (compaware/compress/latency.py). ``target`` (``ratio`` then stays 0): the units to remove
    are ranked over all groups together until the budget is met (:meth:`plan_removals`;
    a latency budget: :mod:`~compaware.compress.latency_budget`), none losing more than
    ``max_layer_cut`` of its units.
    """

    removes = ("units",)

    def __init__(self, ratio: float = 0.0, *, threshold: float = 1e-5,
                 input_shape: tuple[int, ...] = (1, 28, 28), layers: str = "all",
                 skip_first: bool = False, depth: bool = True, shape: bool = True,
                 min_sparsity: float = 0.5, round_to: int = 1, latency_aware: bool = False,
                 latency_batch: int = 32, latency_form: str = "eager",
                 target: str | None = None, max_layer_cut: float = MAX_LAYER_CUT,
                 max_accuracy_drop: float | None = None, search_steps: int = 6) -> None:
        check_range("compress.ratio", ratio, 0, 1)
        if ratio == 1:
            raise UserError("compress.ratio=1 would remove every unit of every layer; "
                            "compress.ratio takes a number in [0, 1) (the share of each "
                            "layer's units to remove, smallest group norms first).")
        check_range("compress.threshold", threshold, 0, 1)
        check_range("compress.min_sparsity", min_sparsity, 0, 1)
        for size in input_shape:
            check_range("compress.input_shape", size, 1, integer=True)
        self.ratio, self.threshold = float(ratio), float(threshold)
        self.depth, self.shape, self.min_sparsity = depth, shape, float(min_sparsity)
        self.input_shape = tuple(int(size) for size in input_shape)
        self.select = LayerSelection("compress", layers, skip_first, skip_last=True)
        self.budget = parse_target(target, self.input_shape)
        self.max_layer_cut = check_max_layer_cut(max_layer_cut, self.budget)
        self.latency = LatencyOptions(round_to=round_to, latency_aware=latency_aware,
                                      latency_batch=latency_batch, input_shape=self.input_shape,
                                      latency_form=latency_form,
                                      measured_budget=timed_budget(self.budget))
        check_alone(self.budget, "ratio", ratio, 0.0)
        self.search = AccuracySearch.of(max_accuracy_drop, search_steps, self.budget)

    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        if timed_budget(self.budget):
            return meet(model, self.budget, self.compress_within, timer=self.timer,
                        batch_size=self.latency.latency_batch, input_shape=self.input_shape)
        return self.compress_within(model, self.budget)

    @torch.no_grad()
    def compress_within(self, model: nn.Module, budget: Budget | None,
                        measured: Measured | None = None) -> tuple[nn.Module, Report]:
        """Prune ``model`` in place by ``ratio``, or to ``budget`` (a latency budget priced by
        ``measured`` timings); the report's ``budget`` says what was reached (for a latency
        budget: planned)."""
        dense = (measured.dense if measured else
                 budget.measure(model, self.input_shape) if budget else 0)
        blocks = remove_zero_branches(model) if self.depth else {}
        before = units_per_layer(model)
        check = self.latency.latency_check(model, self.input_shape, self.timer)
        names = {module: name for name, module in model.named_modules()}
        chosen = [layer for _, layer in self.select(model)]
        ignored = [layer for _, layer in weight_layers(model) if layer not in chosen]
        notes: dict[str, dict] = {}  # per layer: its group's zero units, or why it was left
        parts = traced_parts(model, self.input_shape)
        plan, saved, short = (self.plan_removals(model, parts, names=names, ignored=ignored,
                                                 budget=budget, goal=budget.share * dense,
                                                 measured=measured)
                              if budget else (None, 0, FLOOR))
        for graph, boundary in parts:
            for group in prunable_groups(graph, boundary, ignored):
                self.prune_group(model, graph, group, names=names, notes=notes, check=check,
                                 plan=plan)
        report: Report = {name: entry for name, entry in blocks.items() if entry["removed"]}
        for name, units in units_per_layer(model).items():
            report[name] = {"units": before[name], "kept": units, **notes.get(name, {})}
            if units < before[name]:
                log.info("prune %s: %d → %d units", name, before[name], units)
        if self.shape:
            for name, columns in drop_dead_columns(model, self.select(model),
                                                   min_sparsity=self.min_sparsity,
                                                   check=check).items():
                if columns.get("live_columns", 0) < columns.get("columns", 0):
                    timed = {**report[name].get("latency_ms", {}),  # the unit pruning's too
                             **columns.get("latency_ms", {})}
                    report[name].update(columns, **({"latency_ms": timed} if timed else {}))
        check_still_runs(model, self.input_shape)
        if measured:  # the plan's prediction; latency_budget.meet measures the model
            report["budget"] = budget.outcome(dense, dense - saved, short)
        elif budget:
            report["budget"] = budget.judge(model, self.input_shape, dense, report,
                                            kept="whole", floor=short)
        return model, report

    def plan_removals(self, model: nn.Module, parts: list[tuple], *,
                      names: dict[nn.Module, str], ignored: list[nn.Module], budget: Budget,
                      goal: float, measured: Measured | None
                      ) -> tuple[dict[nn.Module, list[int]], int, str]:
        """The root units to remove per group (keyed by its root layer) so that ``model``
        costs at most ``goal`` in the budget's measure, what they save and why it may fall
        short (:func:`~compaware.compress.prune_plan.take_steps` over every group's steps,
        none below its floor, ``max_layer_cut``; groups that a layer blocks are left out).
        Costs are counted, or for a latency budget measured (``measured``,
        :func:`~compaware.compress.prune_plan.timed_cost`)."""
        steps, sides, floors = [], {}, {}
        for graph, boundary in parts:
            for group in prunable_groups(graph, boundary, ignored):
                if blocking_layer(group) is not None:
                    continue
                unit_importance = importance(unit_norms(graph, group, "out"),
                                             unit_norms(graph, group, "in"), self.threshold)
                reach = unit_reach(graph, group, names)
                for name, side, _ in (entry for entries in reach.values() for entry in entries):
                    sides.setdefault(name, set()).add(side)
                root = group[0].dep.layer
                floors[root] = (len(unit_importance),
                                group_floor(unit_importance, self.max_layer_cut))
                steps += [(value, len(steps) + i, root, units, reach) for i, (value, units)
                          in enumerate(group_steps(unit_importance, self.latency.round_to,
                                                   floors[root][1]))]
        if measured:
            positions = prices(Budget("macs", 1.0), model, self.input_shape).weight
            now = measured.dense
            cost = timed_cost(model, measured, sides, positions, self.latency.round_to)
        else:
            now = budget.measure(model, self.input_shape)
            cost = analytic_cost(prices(budget, model, self.input_shape))
        plan, saved = take_steps(steps, RemovalPlan(model, cost), excess=now - goal,
                                 margin=slack(goal))
        at_floor = [names[root] for root, (units, least) in floors.items()
                    if held(units, len(plan.get(root, [])), self.latency.round_to, least)]
        return plan, saved, floor_reason(at_floor, self.max_layer_cut, "units", FLOOR)

    def prune_group(self, model: nn.Module, graph: tp.DependencyGraph, group: tp.Group, *,
                    names: dict[nn.Module, str], notes: dict[str, dict],
                    check: LatencyCheck | None, plan: dict | None = None) -> None:
        """Remove the group's dead units and its ``ratio`` share (rounded to ``round_to``),
        or with a ``plan`` (:meth:`plan_removals`) the units it names, unless a layer blocks
        it or, with ``latency_aware``, the pruned layers do not time faster (``check``); note
        per writing layer its zero units, or why it was left."""
        writers = [names[item.dep.layer] for item in group
                   if isinstance(item.dep.layer, WEIGHT_LAYERS)
                   and graph.is_out_channel_pruning_fn(item.dep.handler)]
        blocker = blocking_layer(group)
        if blocker is not None:
            reason = f"coupled to {type(blocker).__name__} {names.get(blocker, '')}".strip()
            log.info("prune: %s left whole, %s", ", ".join(writers), reason)
            notes.update({name: {"reason": reason} for name in writers})
            return
        norms = unit_norms(graph, group, "out")
        remove, zero = units_to_remove(norms, unit_norms(graph, group, "in"), ratio=self.ratio,
                                       threshold=self.threshold, round_to=self.latency.round_to)
        if plan is not None:
            remove = sorted(plan.get(group[0].dep.layer, []))
        if zero == len(norms):
            log.warning("prune: all %d units of %s are dead (zero or unread); keeping one "
                        "so that the layer keeps a width of 1", len(norms), ", ".join(writers))
        notes.update({name: {"zero_units": zero} for name in writers})
        if remove and check is not None:
            as_is, pruned = faster_when_pruned(check, model,
                                               pruned_shapes(graph, group, remove, names))
            timed = {"latency_ms": {"layers": as_is * 1e3, "pruned": pruned * 1e3}}
            if pruned >= as_is:
                timed["reason"] = "not faster when timed"
                remove = []
            notes.update({name: {**notes[name], **timed} for name in writers})
        if remove:
            group.prune(remove)


class PruneSVD(Compressor):
    """``compress=prune+svd``: :class:`Prune`, then :class:`SVD` on what is left (the natural
    pairing for ``regularizer=lowrank_sgl``). ``threshold`` is both the zero-unit and the
    zero-singular-value threshold (relative, as in each); ``skip_last`` applies to SVD.

    ``target`` splits the budget between the two: pruning to √share of the dense cost, then
    SVD down to the share itself (its own budget is share × dense / pruned cost, so pruning's
    shortfall or overshoot is made up by the ranks)."""

    removes = ("units", "rank")

    def __init__(self, ratio: float = 0.0, *, threshold: float = 1e-5, energy: float = 1.0,
                 rank: int | None = None, input_shape: tuple[int, ...] = (1, 28, 28),
                 layers: str = "all", skip_first: bool = False, skip_last: bool = False,
                 depth: bool = True, shape: bool = True, min_sparsity: float = 0.5,
                 round_to: int = 1, latency_aware: bool = False, latency_batch: int = 32,
                 latency_form: str = "eager", target: str | None = None,
                 max_layer_cut: float = MAX_LAYER_CUT, max_accuracy_drop: float | None = None,
                 search_steps: int = 6) -> None:
        both = {"threshold": threshold, "input_shape": input_shape, "layers": layers,
                "skip_first": skip_first, "round_to": round_to, "latency_aware": latency_aware,
                "latency_batch": latency_batch, "latency_form": latency_form}
        self.prune = Prune(ratio, depth=depth, shape=shape, min_sparsity=min_sparsity, **both)
        self.svd = SVD(energy=energy, rank=rank, skip_last=skip_last, **both)
        self.latency = self.prune.latency  # the same options as the SVD's
        self.input_shape = self.prune.input_shape
        self.budget = parse_target(target, self.input_shape)
        # each step plans its part of the budget (compress_within), under the same floor
        self.prune.max_layer_cut = self.svd.max_layer_cut = check_max_layer_cut(
            max_layer_cut, self.budget)
        if timed_budget(self.budget):  # its two steps would split a measured share
            raise UserError(f"compress.target={target} is a latency budget, which compress=svd "
                            f"and compress=prune meet, not compress=prune+svd; use one of them, "
                            f"or a params, macs or bytes target here.")
        for option, value, default in (("ratio", ratio, 0.0), ("energy", energy, 1.0),
                                       ("rank", rank, None)):
            check_alone(self.budget, option, value, default)
        self.search = AccuracySearch.of(max_accuracy_drop, search_steps, self.budget)

    def use_timer(self, timer: Timer | None) -> None:
        super().use_timer(timer)
        self.prune.use_timer(timer)
        self.svd.use_timer(timer)

    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        budget = self.budget
        dense = budget.measure(model, self.input_shape) if budget else 0
        model, pruned = self.prune.compress_within(
            model, budget and Budget(budget.kind, math.sqrt(budget.share)))
        rest = budget and Budget(budget.kind, min(1.0, budget.share * dense / budget.measure(
            model, self.input_shape)))
        model, factorized = self.svd.compress_within(model, rest)
        steps = [step.pop("budget") for step in (pruned, factorized) if "budget" in step]
        report: Report = {}
        for name in pruned | factorized:
            first, then = pruned.get(name, {}), factorized.get(name, {})
            report[name] = {**first, **then}
            timed = {**first.get("latency_ms", {}), **then.get("latency_ms", {})}
            if timed:  # both steps' timings, not only the factorization's
                report[name]["latency_ms"] = timed
        if budget:
            why = "; ".join(step["reason"] for step in steps if "reason" in step)
            report["budget"] = budget.outcome(dense, budget.measure(model, self.input_shape),
                                              why or FLOOR)
        return model, report
