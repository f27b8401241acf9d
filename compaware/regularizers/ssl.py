"""Structured Sparsity Learning (Wen et al. 2016; docs/methods.md): group lasso on
filters, channels, filter shapes and residual branches.

    r(W) = lam · Σ_kind strength_kind · Σ_groups ‖w_g‖₂      kind ∈ filter, channel, shape, depth

For a conv weight W (N, C, kh, kw) the groups are filter-wise W[n, :, :, :], channel-wise
W[:, c, :, :] and shape-wise W[:, c, h, w] (one column of the im2col matrix). A linear
weight (out, in) is a 1×1 conv: rows are filters (output units), columns are channels and
shapes (input units), so with both strengths set a column counts in both. Depth-wise, each
residual block's whole branch is one group (``compaware/residual.py``). As in the official
code there is no √(group size) factor.

Two ways to optimise it (``method``), sharing the groups:

- ``subgradient``, the official Caffe code: every step strength · w / ‖w_g‖ is added to
  the gradient, as differentiating the term in the loss would (0 for an all-zero group:
  the norm's gradient at zero is taken as 0, never NaN); after each update (``every:
  step``) every weight of a group with |w| ≤ ``zero_threshold`` is set to exactly 0,
  which is what makes groups exactly zero.
- ``proximal``: no loss term; at ``every`` (step or epoch) each group is soft-thresholded,
  w_g ← max(0, 1 − t · lam · strength / ‖w_g‖) · w_g, kind after kind (the groups overlap,
  so this composes the kinds' proxes rather than computing the prox of their sum), then
  zeroed as above.

Two groups differ from the official code, so that a zero group is a removable one:
- a filter group holds the filter's bias too (``filter_bias``; Caffe shrinks the weight blob
  only, and a zero filter with a bias still outputs a constant map);
- a depth group holds the branch convs and the affine (γ, β) of the BN that ends the branch
  (Caffe groups each branch conv alone and leaves BN out, so a zero branch still outputs β).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compaware import native
from compaware.config import UserError, check_choice, check_range
from compaware.layers import is_grouped
from compaware.native import group_sums as native_group_sums
from compaware.regularizers.base import ProximalRegularizer
from compaware.residual import BRANCHES, branch_is_zero, branch_parameters, residual_blocks

KINDS = ("filter", "channel", "shape", "depth")
LAYER_KINDS = KINDS[:3]
METHODS = ("subgradient", "proximal")
# (weight, rows, columns): d/dweight[i, j...] = weight[i, j...] · (rows[i] + columns[j...])
Subgradient = list[tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class GroupFamily:
    """The groups of one kind in one layer, or the depth group of one residual block.

    Each member is a tensor and the axes that index the groups; its other axes are summed,
    so all members give squared norms of one shape, one entry per group (a scalar for a
    block). A filter family is ((weight, (0,)), (bias, (0,))): rows and their biases.
    """

    kind: str
    name: str
    members: tuple[tuple[Tensor, tuple[int, ...]], ...]

    def norms(self, summaries: dict[int, tuple] | None = None) -> Tensor:
        """‖w_g‖₂ of every group. ``summaries``: a cache shared by the families of one
        penalty, see :func:`_square_sums`."""
        summaries = {} if summaries is None else summaries
        return sum(_square_sums(t, axes, summaries) for t, axes in self.members).sqrt()

    @torch.no_grad()
    def shrink_(self, threshold: float) -> None:
        """Group soft-thresholding in place: w_g ← max(0, 1 − threshold / ‖w_g‖) · w_g."""
        norms = self.norms()
        factor = torch.where(norms > 0, (1 - threshold / norms).clamp_min(0), 0)
        for t, axes in self.members:
            t.mul_(factor.reshape([t.shape[d] if d in axes else 1 for d in range(t.dim())]))


def _square_sums(t: Tensor, axes: tuple[int, ...], summaries: dict[int, tuple]) -> Tensor:
    """Σ t² over every axis not in ``axes``: () (depth groups), (0,) (filters, a bias) or axes
    from 1 on (channels, shapes).

    All come from t's row and column sums of squares (:func:`square_sums`), cached in
    ``summaries`` for the families of one penalty."""
    if id(t) not in summaries:
        summaries[id(t)] = square_sums([t])[0]
    rows, columns = summaries[id(t)]
    if axes in ((), (0,)):
        return rows if axes else rows.sum()
    summed = tuple(d - 1 for d in range(1, t.dim()) if d not in axes)
    return columns.sum(summed) if summed else columns


def square_sums(tensors: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """For each t of ``tensors``: Σ t² over every axis but the first (shape ``t.shape[:1]``)
    and over the first (shape ``t.shape[1:]``); a 1-D ``t`` is a column: its squares and
    their total. Every group norm is a sum of these, so a weight is read once per penalty.
    With ``native_kernels=true``, the C kernel takes every tensor it can in one call."""
    tensors = [t.detach() for t in tensors]
    sums = native_group_sums.square_sums(tensors) if native.enabled() else {}
    for i, t in enumerate(tensors):
        if i not in sums:
            matrix = t.reshape(t.shape[0], -1)
            sums[i] = (torch.linalg.vector_norm(matrix, dim=1).square(),
                       torch.linalg.vecdot(matrix.T, matrix.T))
    return [(sums[i][0].reshape(t.shape[:1]), sums[i][1].reshape(t.shape[1:]))
            for i, t in enumerate(tensors)]


def add_subgradients(terms: Subgradient) -> None:
    """For each (t, rows, columns) of ``terms``: ``t.grad`` += t · (rows[i] + columns[j...])
    for each element t[i, j...], ``rows`` of shape ``t.shape[:1]``, ``columns`` of shape
    ``t.shape[1:]`` (a scalar for a 1-D t). With ``native_kernels=true``, the C kernel takes
    every weight it can in one call."""
    for t, _, _ in terms:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    terms = [(t.detach(), t.grad, rows, columns) for t, rows, columns in terms]
    done = native_group_sums.add_subgradients(terms) if native.enabled() else set()
    for i, (t, grad, rows, columns) in enumerate(terms):
        if i not in done:
            grad.addcmul_(t, rows.reshape(rows.shape + (1,) * (t.dim() - 1)) + columns)


def layer_families(name: str, layer: nn.Module, filter_bias: bool) -> list[GroupFamily]:
    """The filter, channel and shape groups of a conv or linear layer."""
    w = layer.weight
    rows = ((w, (0,)),)
    if filter_bias and layer.bias is not None:
        rows += ((layer.bias, (0,)),)
    return [GroupFamily("filter", name, rows),
            GroupFamily("channel", name, ((w, (1,)),)),
            GroupFamily("shape", name, ((w, tuple(range(1, w.dim()))),))]


def block_family(name: str, block: nn.Module) -> GroupFamily:
    """A residual block's depth group: its whole branch as one group."""
    return GroupFamily("depth", name, tuple((p, ()) for p in branch_parameters(block)))


class SSL(ProximalRegularizer):
    """``regularizer=ssl``: group lasso on filters, channels, shapes and residual branches.

    ``filter``, ``channel``, ``shape``, ``depth`` are the strengths λ_g of each kind (0
    disables it), all multiplied by ``lam``. Filter, channel and shape groups act on the
    selected conv and linear layers (``layers``, ``skip_first``, ``skip_last``; grouped
    convs are left out), depth groups on every residual block of the model.
    """

    leaves = ("units",)  # filters and channels; shape columns and branches go with compress=prune

    def __init__(self, filter: float = 0.0, channel: float = 0.0, shape: float = 0.0,
                 depth: float = 0.0, lam: float = 1.0, method: str = "subgradient",
                 every: str = "step", prox_step: str = "lr_x_steps", zero_threshold: float = 1e-4,
                 filter_bias: bool = True, layers: str = "all", skip_first: bool = False,
                 skip_last: bool = True) -> None:
        super().__init__(lam, every=every, prox_step=prox_step, layers=layers,
                         skip_first=skip_first, skip_last=skip_last)
        self.strength = {"filter": filter, "channel": channel, "shape": shape, "depth": depth}
        for kind, value in self.strength.items():
            check_range(f"regularizer.{kind}", value, 0)
        check_choice("regularizer.method", method, METHODS)
        check_range("regularizer.zero_threshold", zero_threshold, 0)
        self.method, self.zero_threshold = method, float(zero_threshold)
        self.filter_bias = bool(filter_bias)
        self._subgradient: Subgradient = []  # from penalty to after_backward

    def families(self, model: nn.Module, kinds: tuple[str, ...] = KINDS) -> list[GroupFamily]:
        """The group families of ``kinds`` in ``model``."""
        families = [family for name, layer in self.layers(model) if not is_grouped(layer)
                    for family in layer_families(name, layer, self.filter_bias)
                    if family.kind in kinds]
        if "depth" in kinds:
            families += [block_family(name, block) for name, block in residual_blocks(model)]
        return families

    def active_families(self, model: nn.Module) -> list[GroupFamily]:
        """The families with a non-zero strength; stops where a strength has nothing to act on."""
        kinds = tuple(kind for kind in KINDS if self.strength[kind] > 0)
        families = self.families(model, kinds)
        found = {family.kind for family in families}
        if set(kinds) & set(LAYER_KINDS) and not found & set(LAYER_KINDS):
            raise UserError(
                f"regularizer=ssl selects no layer of {type(model).__name__}: "
                f"regularizer.layers={self.select.kind}, skip_first={self.select.skip_first}, "
                f"skip_last={self.select.skip_last} leave no (ungrouped) conv or linear layer "
                f"for the filter, channel and shape groups. Choose layers among all, conv, "
                f"linear, or set regularizer.filter, .channel and .shape to 0.")
        if "depth" in kinds and "depth" not in found:
            raise UserError(
                f"regularizer.depth={self.strength['depth']} needs residual blocks, and "
                f"{type(model).__name__} has none: depth groups act only on residual branches "
                f"(blocks of type {', '.join(t.__name__ for t in BRANCHES)}, e.g. model=resnet20, "
                f"resnet32, or model=torchvision model.name=resnet18). Set regularizer.depth=0.")
        return families

    def check(self, model: nn.Module) -> None:
        self.active_families(model)

    @torch.no_grad()
    def group_lasso(self, families: list[GroupFamily],
                    lam: float) -> tuple[Tensor, Subgradient]:
        """lam · Σ strength · Σ‖w_g‖ over ``families``, and its subgradient: d/dw = w ·
        Σ lam · strength / ‖w_g‖ over the groups w belongs to (0 for a zero group), a sum
        that is a row factor (filter and depth groups) plus a column factor (channel and
        shape groups) for each weight."""
        tensors = {id(t): t for family in families for t, _ in family.members}
        summaries = dict(zip(tensors, square_sums(list(tensors.values())),
                             strict=True))  # all at once: the C kernel shares them among threads
        factors: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        terms = []
        for family in families:
            strength = lam * self.strength[family.kind]
            norms = family.norms(summaries)
            terms.append(strength * norms.sum())
            inverse = torch.where(norms > 0, strength / norms, 0)
            for t, axes in family.members:
                if id(t) not in factors:
                    factors[id(t)] = (t, t.new_zeros(t.shape[:1]), t.new_zeros(t.shape[1:]))
                _, rows, columns = factors[id(t)]
                if axes in ((), (0,)):
                    rows += inverse
                else:
                    columns += inverse.reshape([t.shape[d] if d in axes else 1
                                                for d in range(1, t.dim())])
        return (torch.stack(terms).sum() if terms else torch.zeros(())), list(factors.values())

    def penalty(self, model: nn.Module) -> Tensor:
        """The group lasso's value (``method=subgradient``); its subgradient is added to the
        gradients by :meth:`after_backward`: the same update as differentiating the term in
        the loss, in one fused pass per weight (autograd's is three, and allocates)."""
        if self.method == "proximal":
            return super().penalty(model)
        value, self._subgradient = self.group_lasso(self.active_families(model),
                                                    self.ramp * self.lam)
        return value

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        add_subgradients(self._subgradient)
        self._subgradient = []

    @torch.no_grad()
    def prox(self, model: nn.Module, step: float) -> None:
        """Group soft-thresholding (``method=proximal``), then the official zeroing of every
        grouped weight with |w| ≤ ``zero_threshold``."""
        families = self.active_families(model)
        if self.method == "proximal":
            for family in families:
                family.shrink_(step * self.ramp * self.lam * self.strength[family.kind])
        grouped = {id(t): t for family in families for t, _ in family.members}
        for t in grouped.values():  # |w| ≤ zero_threshold → 0, in one in-place pass
            torch.hardshrink(t, self.zero_threshold, out=t)

    @torch.no_grad()
    def stats(self, model: nn.Module) -> dict[str, float]:
        """Per layer: the fraction of zero filter (row), channel and shape (column) groups;
        the number of residual blocks whose branch is zero; the value of the group lasso."""
        stats: dict[str, float] = {}
        for family in self.families(model, LAYER_KINDS):
            stats[f"{family.kind}_sparsity/{family.name}"] = float(
                (family.norms() == 0).float().mean())
        blocks = residual_blocks(model)
        if blocks:
            stats["zero_blocks"] = sum(branch_is_zero(block) for _, block in blocks)
        kinds = tuple(kind for kind in KINDS if self.strength[kind] > 0)
        stats["group_lasso"] = float(self.group_lasso(self.families(model, kinds), self.lam)[0])
        return stats
