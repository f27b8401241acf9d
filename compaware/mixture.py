"""A Gaussian mixture over scalars: the prior soft weight-sharing learns
(compaware/regularizers/sws.py) and the codebook its quantizer snaps the weights to
(compaware/compress/quantize.py). Shared maths, so neither package imports the other."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)
ASSIGN_CHUNK = 1 << 17  # values per chunk of assign: (chunk × components) terms in memory


@dataclass
class Mixture:
    """A Gaussian mixture over scalars; component 0 is the zero component."""

    means: Tensor
    log_precisions: Tensor
    log_pis: Tensor

    @property
    def stds(self) -> Tensor:
        return (-0.5 * self.log_precisions).exp()

    def log_weighted_densities(self, w: Tensor) -> Tensor:
        """log π_j N(w_i | μ_j, σ_j²): one row per value of ``w``, one column per component."""
        precision = self.log_precisions.exp()
        log_norm = self.log_pis + 0.5 * (self.log_precisions - LOG_2PI)
        return log_norm - 0.5 * precision * (w[:, None] - self.means) ** 2

    def assign(self, w: Tensor, chunk_size: int = ASSIGN_CHUNK) -> Tensor:
        """The most responsible component of each value of ``w`` (chunked)."""
        return torch.cat([self.log_weighted_densities(c).argmax(1)
                          for c in w.split(chunk_size)])

    def merged(self, max_kl: float) -> Mixture:
        """Components whose KL divergence (either way) is below ``max_kl`` merged into one,
        with π-weighted mean and variance and summed mixing proportion, transitively."""
        mu, gamma = self.means, self.log_precisions
        var = (-gamma).exp()
        # KL(N_i ‖ N_j) = ½(γ_i − γ_j) + ½ λ_j (σ_i² + (μ_i − μ_j)²) − ½
        kl = 0.5 * (gamma[:, None] - gamma) + 0.5 * gamma.exp() * (
            var[:, None] + (mu[:, None] - mu) ** 2) - 0.5
        close = (kl < max_kl) | (kl < max_kl).T
        group = list(range(len(mu)))  # union-find over the "close" pairs
        for i, j in close.nonzero().tolist():
            root_i, root_j = _root(group, i), _root(group, j)
            group[max(root_i, root_j)] = min(root_i, root_j)
        roots = torch.tensor([_root(group, i) for i in range(len(mu))])
        pis = self.log_pis.exp()
        new_mu, new_var, new_pi = [], [], []
        for root in roots.unique():
            members = roots == root
            share = pis[members] / pis[members].sum()  # exactly 1 for a lone component
            new_pi.append(pis[members].sum())
            new_mu.append((share * mu[members]).sum())
            new_var.append((share * var[members]).sum())
        return Mixture(torch.stack(new_mu), -torch.stack(new_var).log(),
                       torch.stack(new_pi).log())


def _root(group: list[int], i: int) -> int:
    while group[i] != i:
        i = group[i]
    return i
