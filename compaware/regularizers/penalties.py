"""The plain baselines: ℓ2 (weight decay as a penalty) and ℓ1 on the selected layers' weights."""

from __future__ import annotations

from torch import Tensor, nn

from compaware.regularizers.base import Regularizer


class L2(Regularizer):
    """lam/2 · Σ‖W‖²: the ℓ2 baseline of Han et al. 2015 (biases are not penalised)."""

    def penalty(self, model: nn.Module) -> Tensor:
        return self.ramp * self.lam / 2 * sum(m.weight.pow(2).sum() for _, m in self.layers(model))


class L1(Regularizer):
    """lam · Σ|W|: the ℓ1 baseline (sparsity for magnitude pruning)."""

    def penalty(self, model: nn.Module) -> Tensor:
        return self.ramp * self.lam * sum(m.weight.abs().sum() for _, m in self.layers(model))
