"""Nuclear-norm regularization (Alvarez & Salzmann 2017; docs/methods.md).

r(Θ) = lam · Σ_l ‖W_l‖_*, with each conv weight seen as out × (in·kh·kw). It is
optimised by its proximal operator, singular-value soft-thresholding:
W = U Σ Vᵀ  →  U max(Σ − t·lam, 0) Vᵀ, which sets small singular values exactly to zero,
so that ``compress=svd`` can then drop them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compaware.layers import is_grouped, weight_matrix
from compaware.regularizers.base import ProximalRegularizer

RANK_TOLERANCE = 1e-5  # σ ≤ tolerance · σ_max counts as zero (float32 round-off after a prox)


def shrink_singular_values(matrix: Tensor, threshold: float) -> Tensor:
    """prox of threshold·‖·‖_*: soft-threshold the singular values of ``matrix``.

    Rows (or, for a tall matrix, columns) that are entirely zero, such as the dead units
    group sparsity leaves, stay zero under the prox, so only the live ones enter the
    computation: that makes it cheaper, and it keeps out the many exactly-zero eigenvalues
    on which ``eigh`` fails (see :func:`_shrink_rows`). Rows that group sparsity has shrunk
    to subnormal values count as zero: far below any threshold, they would only break
    ``eigh``.
    """
    wide = matrix.shape[0] <= matrix.shape[1]
    rows = matrix if wide else matrix.T
    # "not all tiny" rather than "any large": a NaN row is live, non-finite weights must not vanish
    live = ~(rows.abs() < torch.finfo(rows.dtype).tiny).all(1)
    shrunk = torch.zeros_like(rows)
    if live.any():
        shrunk[live] = _shrink_rows(rows[live], threshold)
    return shrunk if wide else shrunk.T


def _shrink_rows(matrix: Tensor, threshold: float) -> Tensor:
    """The prox for a matrix with no more rows than columns.

    U max(Σ − t, 0) Vᵀ = U diag(max(σ − t, 0)/σ) Uᵀ M, with U and σ² from the eigenvectors
    and eigenvalues of the small Gram matrix M Mᵀ: no V and no SVD, which is what makes a
    per-step prox affordable (about 3× faster on a CPU for LeNet-5's 500 × 800 fc1;
    scripts/bench_overhead.py). Small σ come out less precise (through σ²), but every
    σ ≤ t is zeroed whatever its value, and the kept ones are accurate to float round-off of
    σ_max²/σ. Only the k kept directions enter the products (``eigh`` sorts σ ascending: they
    are the last k), so the projection costs k/n of a full one once training has made the
    layer low-rank. Where ``eigh`` fails on finite weights (an ill-conditioned Gram matrix: it
    does not converge, even in float64, or returns NaN without an error, as on rows that group
    sparsity shrank to subnormal values), a float64 SVD of the matrix itself does it.
    """
    try:
        eigenvalues, vectors = torch.linalg.eigh(matrix @ matrix.T)
    except torch.linalg.LinAlgError:
        if not torch.isfinite(matrix).all():
            raise
        return _shrink_by_svd(matrix, threshold)
    if not torch.isfinite(vectors).all() and torch.isfinite(matrix).all():
        return _shrink_by_svd(matrix, threshold)
    s = eigenvalues.clamp_min(0).sqrt()
    first_kept = len(s) - int((s > threshold).sum())
    u, scale = vectors[:, first_kept:], 1 - threshold / s[first_kept:]
    return (u * scale) @ (u.T @ matrix)


def _shrink_by_svd(matrix: Tensor, threshold: float) -> Tensor:
    """The prox from a float64 SVD: slower than the Gram route, and works on any finite matrix."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return ((u * (s - threshold).clamp_min(0)) @ vh).to(matrix.dtype)


def rank_of_spectrum(s: Tensor, tolerance: float = RANK_TOLERANCE) -> int:
    """How many singular values ``s`` are above ``tolerance`` × the largest."""
    return int((s > tolerance * s.max()).sum()) if s.max() > 0 else 0


class LowRank(ProximalRegularizer):
    """Nuclear norm on the selected layers, by proximal steps (``regularizer=lowrank``).

    Grouped and depthwise convs are left out: their weight matrix is not the map an SVD
    factorization would replace.
    """

    leaves = ("rank",)

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in super().layers(model) if not is_grouped(m)]

    @torch.no_grad()
    def prox(self, model: nn.Module, step: float) -> None:
        for _, layer in self.layers(model):
            w = weight_matrix(layer)
            w.copy_(shrink_singular_values(w.float(), step * self.ramp * self.lam).to(w.dtype))

    @torch.no_grad()
    def stats(self, model: nn.Module) -> dict[str, float]:
        stats: dict[str, float] = {}
        nuclear = 0.0
        for name, layer in self.layers(model):
            s = torch.linalg.svdvals(weight_matrix(layer).float())  # one SVD serves both
            stats[f"rank/{name}"] = rank_of_spectrum(s)
            nuclear += float(s.sum())
        stats["nuclear_norm"] = nuclear
        stats["objective"] = self.lam * nuclear
        return stats
