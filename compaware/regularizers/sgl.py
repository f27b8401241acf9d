"""Sparse group lasso over units (Alvarez & Salzmann 2016; docs/methods.md).

One group per output unit of each selected layer: a linear row or a conv filter (all its
in-channels × kh × kw) with its bias. P_l is the group size of layer l and

    r(Θ) = Σ_l λ_l [(1−α) √P_l Σ_n ‖θ_l^n‖₂ + α ‖θ_l‖₁],

optimised by its proximal operator: soft-threshold every element by t·α·λ_l, then shrink
each group by t·(1−α)·λ_l·√P_l, which sets whole groups, i.e. whole units, exactly to zero.
t comes from the learning rate (``prox_step``, see :class:`ProximalRegularizer`).

Our addition to the paper's groups: where a layer's output goes straight into a BatchNorm,
the unit's group also holds that BatchNorm's scale and shift for the unit. A filter whose
weights and bias are zero still outputs β − γ·mean/std after BatchNorm, a constant that
removing the unit would lose; with γ and β in the group, a zero group outputs exactly zero
and ``compress=prune`` removes it without changing the network's outputs.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compaware.config import check_range
from compaware.layers import batchnorm_after
from compaware.regularizers.base import ProximalRegularizer


def sgl_prox(groups: Tensor, l1_threshold: float, group_threshold: float) -> Tensor:
    """prox of l1_threshold·‖X‖₁ + group_threshold·Σ_n ‖X_n‖₂ where the rows X_n are the groups:
    soft-threshold every element, then shrink every row's norm by ``group_threshold``; a row
    whose norm falls below it becomes exactly zero."""
    x = groups.sign() * (groups.abs() - l1_threshold).clamp_min(0)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    scale = (1 - group_threshold / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0)
    return x * scale


@dataclass
class Units:
    """The unit groups of one layer: row n of each tensor is unit n's share of its group."""

    name: str
    layer: nn.Module
    norm: nn.Module | None  # the BatchNorm the layer's output goes straight into

    def tensors(self) -> list[Tensor]:
        owners = [self.layer] if self.norm is None else [self.layer, self.norm]
        return [p for owner in owners for p in (owner.weight, owner.bias) if p is not None]

    def matrix(self) -> Tensor:
        """units × P: each row a whole group (a copy, in float32)."""
        return torch.cat([t.detach().reshape(len(t), -1).float() for t in self.tensors()], 1)

    def assign(self, matrix: Tensor) -> None:
        """Write the rows of ``matrix`` back into the tensors they came from."""
        tensors = self.tensors()
        widths = [t[0].numel() for t in tensors]
        for t, part in zip(tensors, matrix.split(widths, 1), strict=True):
            t.copy_(part.reshape(t.shape).to(t.dtype))


class SGL(ProximalRegularizer):
    """Sparse group lasso over units, by proximal steps (``regularizer=sgl``).

    ``lam`` is λ_l of every selected layer except the first ``first_layers`` ones, which get
    ``lam_first`` (the paper uses a smaller λ for the first layers); ``alpha`` is the ℓ1
    share (α = 0: plain group sparsity). The output layer is skipped by default
    (``skip_last``): its units are the classes.
    """

    leaves = ("units",)

    def __init__(self, lam: float, alpha: float = 0.5, lam_first: float | None = None,
                 first_layers: int = 0, every: str = "epoch", prox_step: str = "lr_x_steps",
                 layers: str = "all", skip_first: bool = False, skip_last: bool = True) -> None:
        super().__init__(lam, every=every, prox_step=prox_step, layers=layers,
                         skip_first=skip_first, skip_last=skip_last)
        check_range("regularizer.alpha", alpha, 0, 1)
        if lam_first is not None:
            check_range("regularizer.lam_first", lam_first, 0)
        check_range("regularizer.first_layers", first_layers, 0, integer=True)
        self.alpha = float(alpha)
        self.lam_first = self.lam if lam_first is None else float(lam_first)
        self.first_layers = int(first_layers)
        # The groups of each model seen, found once: tracing the model for its BatchNorms at
        # every per-step prox would cost more than the prox itself.
        self._units: weakref.WeakKeyDictionary[nn.Module, list[Units]] = (
            weakref.WeakKeyDictionary())

    def units(self, model: nn.Module) -> list[Units]:
        if model not in self._units:
            norms = batchnorm_after(model)
            self._units[model] = [Units(name, layer, norms.get(name))
                                  for name, layer in self.layers(model)]
        return self._units[model]

    def strength(self, index: int) -> float:
        """λ_l of the ``index``-th selected layer."""
        return self.lam_first if index < self.first_layers else self.lam

    @torch.no_grad()
    def prox(self, model: nn.Module, step: float) -> None:
        for index, units in enumerate(self.units(model)):
            groups = units.matrix()
            lam = self.ramp * self.strength(index)
            group_size = groups.shape[1]
            units.assign(sgl_prox(groups, step * self.alpha * lam,
                                  step * (1 - self.alpha) * lam * math.sqrt(group_size)))

    @torch.no_grad()
    def stats(self, model: nn.Module) -> dict[str, float]:
        """Per layer the live units (non-zero groups) and the share of zero groups; in total
        the live units, the share of zero groups and the value of r(Θ)."""
        stats: dict[str, float] = {}
        live = total = 0
        objective = 0.0
        for index, units in enumerate(self.units(model)):
            groups = units.matrix()
            norms = torch.linalg.vector_norm(groups, dim=1)
            alive = int((norms > 0).sum())
            stats[f"units/{units.name}"] = alive
            stats[f"zero_groups/{units.name}"] = 1 - alive / len(norms)
            live, total = live + alive, total + len(norms)
            objective += self.strength(index) * float(
                (1 - self.alpha) * math.sqrt(groups.shape[1]) * norms.sum()
                + self.alpha * groups.abs().sum())
        stats["units"] = live
        stats["zero_groups"] = 1 - live / total if total else 0.0
        stats["objective"] = objective
        return stats
