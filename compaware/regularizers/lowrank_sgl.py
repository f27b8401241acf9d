"""Low rank and unit sparsity together (Alvarez & Salzmann 2017; docs/methods.md).

r(Θ) = τ·lam·Σ_l ‖W_l‖_* + (1−τ)·SGL(Θ), where SGL is :class:`SGL` with its per-layer
strengths λ_l (``lam``, ``lam_first``) and ℓ1 share ``alpha``. The paper does not confirm the
exact form; this is its natural reading. The nuclear part uses the one strength
``lam`` for every layer, as ``regularizer=lowrank`` does, so that τ = 1 is exactly
``lowrank`` and τ = 0 exactly ``sgl``.

Both proxes are applied one after the other with the same step t: singular-value
soft-thresholding by t·τ·lam, then the SGL prox with t scaled by (1−τ). SGL goes last, so
the zero groups it leaves are exact zeros for ``compress=prune+svd``.
"""

from __future__ import annotations

import torch
from torch import nn

from compaware.config import check_range
from compaware.regularizers.lowrank import LowRank
from compaware.regularizers.sgl import SGL


class LowRankSGL(SGL):
    """τ·nuclear norm + (1−τ)·sparse group lasso by proximal steps (``regularizer=lowrank_sgl``)."""

    leaves = ("rank", "units")

    def __init__(self, lam: float, tau: float = 0.5, alpha: float = 0.5,
                 lam_first: float | None = None, first_layers: int = 0, every: str = "epoch",
                 prox_step: str = "lr_x_steps", layers: str = "all", skip_first: bool = False,
                 skip_last: bool = True) -> None:
        selection = {"layers": layers, "skip_first": skip_first, "skip_last": skip_last}
        super().__init__(lam, alpha=alpha, lam_first=lam_first, first_layers=first_layers,
                         every=every, prox_step=prox_step, **selection)
        check_range("regularizer.tau", tau, 0, 1)
        self.tau = float(tau)
        self.nuclear = LowRank(self.lam * self.tau, every=every, prox_step=prox_step,
                               **selection)

    @torch.no_grad()
    def prox(self, model: nn.Module, step: float) -> None:
        # A term with zero weight is skipped, not applied with a zero threshold: an SVD
        # round trip is not bit-exact, and τ = 0 or 1 must be exactly sgl or lowrank. The
        # nuclear part keeps its own ramp at 1: this one's ramp enters through its step.
        if self.tau > 0:
            self.nuclear.prox(model, self.ramp * step)
        if self.tau < 1:
            super().prox(model, (1 - self.tau) * step)

    def stats(self, model: nn.Module) -> dict[str, float]:
        """Both terms' stats (ranks, nuclear norm, live units, zero groups); ``objective``
        is the whole r(Θ), ``sgl_objective`` the SGL term before its (1−τ) weight."""
        nuclear, sgl = self.nuclear.stats(model), super().stats(model)
        objective = nuclear["objective"] + (1 - self.tau) * sgl["objective"]
        return {**nuclear, **sgl, "sgl_objective": sgl["objective"], "objective": objective}
