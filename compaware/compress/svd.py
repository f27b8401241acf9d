"""Low-rank compression by truncated SVD (Alvarez & Salzmann 2017; docs/methods.md).

A conv W (out, in, kh, kw), seen as out × (in·kh·kw) = U Σ Vᵀ, truncated to rank r,
becomes two convs: r filters of in×kh×kw (√Σ Vᵀ, with the original stride, padding and
dilation), then a 1×1 conv r → out (U √Σ, with the bias). A linear becomes two linears.
A layer is factorized only where that is cheaper: r·(out + in·kh·kw) < out·in·kh·kw,
which is the same inequality for parameters and for MACs (both convs run at the original
layer's output resolution, whatever its kernel, stride, padding or dilation).

Every conv and linear is a candidate (standard, 1×1, DecomposeMe's k×1 and 1×k). Skipped,
with the reason logged and reported: grouped and depthwise convs (their weight matrix is
not the layer's linear map) and layers whose parent reads ``.weight`` directly instead of
calling them (``nn.MultiheadAttention.out_proj``, Swin's attention), which a pair of layers
cannot replace.

With ``compress.target`` (:mod:`~compaware.compress.budget`) the ranks are chosen for all
selected layers together (:func:`allocate_ranks`); for a latency budget each layer's pair is
timed at a few ranks (:func:`timed_spectra`, :mod:`~compaware.compress.latency_budget`).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from compaware.compress.base import AccuracySearch, Compressor, Report
from compaware.compress.budget import (
    MAX_LAYER_CUT,
    Budget,
    check_alone,
    check_max_layer_cut,
    floor_reason,
    layer_floor,
    parse_target,
    prices,
    slack,
)
from compaware.compress.latency import LatencyOptions, round_up
from compaware.compress.latency_budget import Curve, Measured, meet, nanoseconds, samples
from compaware.config import check_range
from compaware.layers import (
    LayerSelection,
    is_grouped,
    read_by_parent,
    weight_layers,
    weight_matrix,
)

log = logging.getLogger(__name__)


def choose_rank(singular_values: Tensor, energy: float, threshold: float,
                max_rank: int | None) -> int:
    """The rank to keep: no singular value at or below ``threshold``·σ_max (those are the
    zeros a nuclear-norm prox left), the smallest rank keeping ``energy`` of Σσ², and at
    most ``max_rank``; never below 1."""
    s = singular_values
    rank = int((s > threshold * s.max()).sum())
    if energy < 1.0:
        kept = torch.cumsum(s**2, 0) / (s**2).sum()
        rank = min(rank, int((kept < energy).sum()) + 1)
    if max_rank is not None:
        rank = min(rank, max_rank)
    return max(rank, 1)


def singular_triplets(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U, σ (descending) and Vᵀ of ``matrix`` (thin), from the eigendecomposition of its
    smaller Gram matrix in float64: σ² are the eigenvalues, Vᵀ = Σ⁻¹ Uᵀ M (mirrored for a tall
    matrix). Several times faster than ``torch.linalg.svd`` on a CPU for ResNet-50's layers
    (0.6 s against 2.5 s for a 512 × 4608 one), and in float64 σ is resolved down to ~1e-8 σ_max,
    well below any rank threshold; U Σ Vᵀ reproduces ``matrix`` to float32 precision."""
    wide = matrix.shape[0] <= matrix.shape[1]
    m = matrix.double() if wide else matrix.double().T
    eigenvalues, vectors = torch.linalg.eigh(m @ m.T)
    u = vectors.flip(1)
    s = eigenvalues.flip(0).clamp_min(0).sqrt()
    vh = (u.T @ m) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    u, s, vh = (t.to(matrix.dtype) for t in (u, s, vh))
    return (u, s, vh) if wide else (vh.T, s, u.T)


def factorize(layer: nn.Module, u: Tensor, s: Tensor, vh: Tensor, rank: int) -> nn.Sequential:
    """``layer`` as two layers of rank ``rank`` built from its SVD factors."""
    root = s[:rank].sqrt()
    first_w = root[:, None] * vh[:rank]  # rank × (in·kh·kw)
    second_w = u[:, :rank] * root  # out × rank
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, layer.out_features, bias=has_bias)
    else:
        conv = type(layer)  # Conv1d or Conv2d
        first = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation, bias=False,
                     padding_mode=layer.padding_mode)
        second = conv(rank, layer.out_channels, 1, bias=has_bias)
    pair = nn.Sequential(first, second).to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        pair[0].weight.copy_(first_w.reshape(pair[0].weight.shape))
        pair[1].weight.copy_(second_w.reshape(pair[1].weight.shape))
        if has_bias:
            pair[1].bias.copy_(layer.bias)
    return pair


@dataclass(frozen=True)
class Spectrum:
    """What :func:`allocate_ranks` needs of a layer: its singular values (descending), its
    weight matrix's shape and what one weight entry costs (:class:`~.budget.Prices`), or
    for a latency budget (``timed``) what the layer or pair of a rank measures."""

    s: Tensor
    out_dim: int
    in_dim: int
    price: int
    timed: Callable[[int], int] | None = None

    def cost(self, rank: int) -> int:
        """At full rank the dense layer, else the pair (biases cost the same either way)."""
        if self.timed is not None:
            return self.timed(rank)
        if rank == len(self.s):
            return self.out_dim * self.in_dim * self.price
        return rank * (self.out_dim + self.in_dim) * self.price

    def ranks(self, round_to: int) -> list[int]:
        """The ranks worth having, largest first: multiples of ``round_to`` (at least 1) at
        which the pair is cheaper than the layer."""
        full = len(self.s)
        return [r for r in range((full - 1) // round_to * round_to, 0, -round_to)
                if r * (self.out_dim + self.in_dim) < self.out_dim * self.in_dim]

    def least(self, threshold: float, max_cut: float) -> int:
        """The lowest rank a plan may give the layer (:func:`~.budget.layer_floor`; singular
        values ≤ ``threshold``·σ_max are dead)."""
        live = int((self.s > threshold * self.s.max()).sum())
        return layer_floor(len(self.s), live, max_cut)

    def held(self, rank: int, round_to: int, least: int) -> bool:
        """Whether the floor ``least`` is all that keeps the layer from its next rank down."""
        lower = [r for r in self.ranks(round_to) if r < rank]
        return bool(lower) and lower[0] < least


def rank_steps(name: str, spectrum: Spectrum, *, round_to: int, threshold: float,
               least: int = 1) -> list[tuple[float, str, int, int]]:
    """The layer's steps down, in order: (energy lost per cost saved, name, new rank, cost
    saved). The first goes from dense to the largest rank that saves, each next one drops
    ``round_to`` more singular values, or more where that saves nothing (a timed pair may be
    slower than the layer down to well below the break-even rank), none below rank
    ``least``. Energy is the layer's share of Σσ², so that layers of any scale compare;
    singular values ≤ ``threshold``·σ_max count as no energy."""
    s = spectrum.s.double()
    energy = torch.where(s > threshold * s.max(), s**2, 0.0)
    energy = energy / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
    steps, rank = [], len(s)
    for new_rank in (r for r in spectrum.ranks(round_to) if r >= least):
        saved = spectrum.cost(rank) - spectrum.cost(new_rank)
        if saved <= 0:
            continue
        lost = float(energy[new_rank:rank].sum())
        steps.append((lost / max(saved, 1), name, new_rank, saved))
        rank = new_rank
    return steps


def allocate_ranks(spectra: dict[str, Spectrum], excess: float, *, round_to: int = 1,
                   threshold: float = 0.0, slack: float = 0.0,
                   max_cut: float = 1.0) -> dict[str, int]:
    """A rank per layer that saves ``excess`` of the budget's cost over all layers together,
    greedily: take, over all layers at once, the step that loses the least energy per cost
    saved, until enough is saved (steps that lose nothing are taken anyway: the zeros a
    nuclear-norm prox left). A layer's steps come in order; a layer left at full rank stays
    dense. A step that would save more than ``slack`` too much ends its layer's steps (the
    others fill the rest more finely), unless nothing else gets close enough. No layer
    goes below its floor (:meth:`Spectrum.least`: at most ``max_cut`` of its rank removed)."""
    ranks = {name: len(spectrum.s) for name, spectrum in spectra.items()}
    pending = {name: rank_steps(name, spectrum, round_to=round_to, threshold=threshold,
                                least=spectrum.least(threshold, max_cut))[::-1]
               for name, spectrum in spectra.items()}
    heap = [steps.pop() for steps in pending.values() if steps]
    heapq.heapify(heap)
    too_big = []
    while heap and (excess > 0 or heap[0][0] == 0):
        step = heapq.heappop(heap)
        _, name, rank, saved = step
        if saved - excess > slack and step[0] > 0:
            too_big.append(step)
            continue
        ranks[name], excess = rank, excess - saved
        if pending[name]:
            heapq.heappush(heap, pending[name].pop())
    if excess > slack and too_big:  # short of the budget: the smallest overshoot after all
        _, name, rank, _ = min(too_big, key=lambda step: step[3])
        ranks[name] = rank
    return ranks


# Why a budget is not reached when the plan itself can lower no rank further.
FLOOR = ("every selected layer is at its smallest rank (compress.round_to) or cannot be "
         "factorized; select more layers or ask for less")


def shortfall(spectra: dict[str, Spectrum], ranks: dict[str, int], *, round_to: int,
              threshold: float, max_cut: float) -> str:
    """Why a plan of ``ranks`` may fall short of its budget: the layers that
    ``compress.max_layer_cut`` holds at their floor, if any, else :data:`FLOOR`."""
    held = [name for name, spectrum in spectra.items()
            if spectrum.held(ranks[name], round_to, spectrum.least(threshold, max_cut))]
    return floor_reason(held, max_cut, "rank", FLOOR)


class SVD(Compressor):
    """``compress=svd``: factorize every selected conv/linear where it gets cheaper.

    Rank per layer: see :func:`choose_rank` (``energy``, ``threshold``, ``rank``), then
    rounded up to a multiple of ``round_to``; with ``target`` instead (``energy`` and
    ``rank`` then stay at their defaults), :func:`allocate_ranks` over all selected layers,
    none of which loses more than ``max_layer_cut`` of its rank.
    With ``latency_aware``, a layer is factorized only where the pair is faster than the
    layer, timed at ``latency_batch`` samples of ``input_shape`` in ``latency_form``
    (compaware/compress/latency.py); a refused pair leaves its layer dense, and a budget
    that it was planned to serve is then reported as not reached, with the reason.
    Layers it cannot factorize are skipped and reported with the reason (module docstring).
    """

    removes = ("rank",)

    def __init__(self, energy: float = 1.0, *, rank: int | None = None, threshold: float = 1e-5,
                 layers: str = "all", skip_first: bool = False, skip_last: bool = False,
                 round_to: int = 1, latency_aware: bool = False, latency_batch: int = 32,
                 input_shape: tuple[int, ...] | None = None,
                 latency_form: str = "eager", target: str | None = None,
                 max_layer_cut: float = MAX_LAYER_CUT, max_accuracy_drop: float | None = None,
                 search_steps: int = 6) -> None:
        check_range("compress.energy", energy, 0, 1, low_open=True)
        if rank is not None:
            check_range("compress.rank", rank, 1, integer=True)
        check_range("compress.threshold", threshold, 0, 1)
        self.energy, self.rank, self.threshold = float(energy), rank, float(threshold)
        self.select = LayerSelection("compress", layers, skip_first, skip_last)
        self.input_shape = tuple(input_shape) if input_shape else None
        self.budget = parse_target(target, self.input_shape)
        self.max_layer_cut = check_max_layer_cut(max_layer_cut, self.budget)
        self.latency = LatencyOptions(round_to=round_to, latency_aware=latency_aware,
                                      latency_batch=latency_batch, input_shape=input_shape,
                                      latency_form=latency_form,
                                      measured_budget=timed_budget(self.budget))
        check_alone(self.budget, "energy", energy, 1.0)
        check_alone(self.budget, "rank", rank, None)
        self.search = AccuracySearch.of(max_accuracy_drop, search_steps, self.budget)

    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        if timed_budget(self.budget):
            return meet(model, self.budget, self.compress_within, timer=self.timer,
                        batch_size=self.latency.latency_batch, input_shape=self.input_shape)
        return self.compress_within(model, self.budget)

    @torch.no_grad()
    def compress_within(self, model: nn.Module, budget: Budget | None,
                        measured: Measured | None = None) -> tuple[nn.Module, Report]:
        """Factorize ``model`` in place with per-layer ranks, or ranks that meet ``budget``
        (a latency budget priced by ``measured`` timings); the report's ``budget`` says what
        was reached (for a latency budget: planned)."""
        report: Report = {}
        dense = (measured.dense if measured else
                 budget.measure(model, self.input_shape) if budget else 0)
        check = self.latency.latency_check(model, self.input_shape, self.timer)
        candidates = self.candidates(model, report)
        if budget:
            keep_classifier(model, candidates, report)
        spectra = (self.spectra(model, candidates, budget, measured) if budget else {})
        plan = {"round_to": self.latency.round_to, "threshold": self.threshold,
                "max_cut": self.max_layer_cut}
        ranks = (allocate_ranks(spectra, dense - budget.share * dense,
                                slack=slack(budget.share * dense), **plan) if budget else
                 {name: round_up(choose_rank(s, self.energy, self.threshold, self.rank),
                                 self.latency.round_to, len(s))
                  for name, (_, _, s, _) in candidates.items()})
        for name, (layer, u, s, vh) in candidates.items():
            rank = ranks[name]
            out_dim, in_dim = u.shape[0], vh.shape[1]
            cheaper = rank * (out_dim + in_dim) < out_dim * in_dim
            report[name] = {"rank": rank, "full_rank": len(s), "factorized": cheaper}
            if not cheaper:
                report[name]["reason"] = "not cheaper at this rank"
                continue
            pair = factorize(layer, u, s, vh, rank)
            if check is None or check.keeps(name, layer, pair, entry=report[name],
                                            flag="factorized", label="factorized"):
                model.set_submodule(name, pair)
        if measured:  # the plan's prediction; latency_budget.meet measures the model
            saved = sum(spectra[name].cost(len(spectra[name].s)) - spectra[name].cost(rank)
                        for name, rank in ranks.items() if report[name]["factorized"])
            report["budget"] = budget.outcome(dense, dense - saved,
                                              shortfall(spectra, ranks, **plan))
        elif budget:
            report["budget"] = budget.judge(model, self.input_shape, dense, report, kept="dense",
                                            floor=shortfall(spectra, ranks, **plan))
        return model, report

    def candidates(self, model: nn.Module, report: Report) -> dict[str, tuple]:
        """The selected layers that can be factorized, with their SVD (layer, U, σ, Vᵀ); the
        others are reported with the reason."""
        found = {}
        for name, layer in self.select(model):
            skip = ("grouped conv" if is_grouped(layer) else
                    "its parent reads the weight directly" if read_by_parent(model, name) else
                    None)
            if skip:
                log.info("svd: %s (%s) left as it is: %s", name, type(layer).__name__, skip)
                report[name] = {"factorized": False, "reason": skip}
                continue
            w = weight_matrix(layer).float()
            if w.numel() == 0:  # e.g. a live-column layer with no live column left
                report[name] = {"factorized": False, "reason": "no weights"}
                continue
            found[name] = (layer, *singular_triplets(w))
        return found

    def spectra(self, model: nn.Module, candidates: dict[str, tuple], budget: Budget,
                measured: Measured | None) -> dict[str, Spectrum]:
        """The candidates as :func:`allocate_ranks` weighs them: priced in ``budget``'s
        measure, or timed (:func:`timed_spectra`) for a latency budget."""
        if measured:
            return timed_spectra(candidates, measured, self.latency.round_to)
        price = prices(budget, model, self.input_shape)
        return {name: Spectrum(s, u.shape[0], vh.shape[1], price.weight[name])
                for name, (_, u, s, vh) in candidates.items()}


CLASSIFIER = ("the model's last layer, its classifier: a budget leaves it whole (at a rank "
              "below its outputs, some classes can no longer be told apart); "
              "compress.target=null with compress.energy or compress.rank factorizes it")


def keep_classifier(model: nn.Module, candidates: dict[str, tuple], report: Report) -> None:
    """Take the model's last conv or linear out of a budget's ``candidates``. Its outputs are
    the logits: at rank r they span r dimensions, so below the class count some classes can
    never score highest, yet its few parameters make that cut look cheap to a plan (LeNet-5
    under prune+svd at params:0.25: the 333→10 classifier at rank 1, 29 % fine-tuned)."""
    last = weight_layers(model)[-1][0]
    if candidates.pop(last, None) is not None:
        report[last] = {"factorized": False, "reason": CLASSIFIER}


def timed_budget(budget: Budget | None) -> bool:
    return budget is not None and budget.kind == "latency"


def timed_spectra(candidates: dict[str, tuple], measured: Measured,
                  round_to: int) -> dict[str, Spectrum]:
    """Each candidate's cost by rank, measured: the layer itself at full rank, its pair
    timed at a few of the ranks a plan can give it (:func:`~.latency_budget.samples`) and
    interpolated in between, on the layer's input at the latency batch."""
    spectra = {}
    for name, (layer, u, s, vh) in candidates.items():
        shape = measured.cache.check.input_of(name, layer)
        spectrum = Spectrum(s, u.shape[0], vh.shape[1], 0)
        dense = measured.cache(layer, shape)
        pairs = Curve({rank: measured.cache(factorize(layer, u, s, vh, rank), shape)
                       for rank in samples(spectrum.ranks(round_to))})
        spectra[name] = Spectrum(s, u.shape[0], vh.shape[1], 0, timed=partial(
            timed_cost, len(s), dense, pairs))
    return spectra


def timed_cost(full: int, dense: float, pairs: Curve, rank: int) -> int:
    return nanoseconds(dense if rank == full else pairs(rank))

