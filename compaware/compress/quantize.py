"""Weight sharing: every weight of a layer becomes one of a few shared values.

- ``compress=quantize`` is soft weight-sharing's post-processing (Ullrich et al. 2017,
  docs/methods.md): merge the mixture components learned by ``regularizer=sws`` whose KL
  divergence is below ``merge_kl`` (π-weighted mean and variance), set the mean closest to
  zero to 0, and set each weight (and bias, where the prior covered biases) to the mean of its
  most responsible component. Weights sent to 0 are pruned.
- ``compress=kmeans`` is Deep Compression's weight sharing (Han et al. 2016; docs/methods.md),
  usable after any regularizer: per layer, 1-D k-means over the non-zero weights with linear
  initialisation, 2**bits − 1 shared values (code 0 is the zero of pruned weights); zeros stay
  zero, so it chains after ``compress=magnitude``. Fine-tuning then trains the shared values.

Both keep the architecture; the model is stored in the sparse codebook format of
:mod:`compaware.compress.storage`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compaware.compress.base import Report
from compaware.compress.sparse import SparseCompressor, nonzero_fraction
from compaware.config import check_range
from compaware.mixture import Mixture


class Quantize(SparseCompressor):
    """``compress=quantize``: snap the weights to the mixture ``regularizer=sws`` learned.

    The parameters quantized (and so the layers, and whether biases are) are those the prior
    covered: the ``mixture`` artifact of training comes with their names.
    """

    requires = ("mixture",)

    def __init__(self, merge_kl: float = 1e-10, entropy: str = "none") -> None:
        super().__init__(entropy=entropy)
        check_range("compress.merge_kl", merge_kl, 0)
        self.merge_kl = float(merge_kl)
        self.mixture: Mixture | None = None
        self.parameters: list[str] = []

    def missing_message(self, missing: list[str], source: str) -> str:
        return (f"compress=quantize snaps the weights to the Gaussian mixture learned by "
                f"regularizer=sws, but no mixture comes from {source}. Use regularizer=sws, "
                f"or compress=kmeans for post-hoc weight sharing after any regularizer.")

    def prepare(self, artifacts: dict) -> None:
        self.mixture, self.parameters = artifacts["mixture"], list(artifacts["parameters"])
        self.shared_biases = any(name.endswith(".bias") for name in self.parameters)

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        names = [name.removesuffix(".weight") for name in self.parameters
                 if name.endswith(".weight")]
        return [(name, model.get_submodule(name)) for name in names]

    @torch.no_grad()
    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        merged = self.mixture.merged(self.merge_kl)
        means = merged.means.clone()
        means[means.abs().argmin()] = 0.0
        mixture = Mixture(means, merged.log_precisions, merged.log_pis)
        for name in self.parameters:
            tensor = model.get_parameter(name)
            tensor.copy_(means[mixture.assign(tensor.reshape(-1))].view_as(tensor))
        report: Report = {name: {"nonzero_fraction": nonzero_fraction(layer.weight),
                                 "shared_values": int(layer.weight.unique().numel())}
                          for name, layer in self.layers(model)}
        report["mixture"] = {"components": len(self.mixture.means),
                             "after_merging": len(means), "means": means.tolist()}
        return model, report


def kmeans_1d(values: Tensor, k: int, iterations: int) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on scalars from ``k`` centroids spaced linearly over [min, max] (Deep
    Compression's initialisation); returns the sorted centroids and each value's cluster."""
    centroids = torch.linspace(float(values.min()), float(values.max()), k,
                               dtype=values.dtype, device=values.device)

    def nearest(centroids: Tensor) -> Tensor:
        return torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)

    for _ in range(iterations):
        cluster = nearest(centroids)
        sums = torch.zeros_like(centroids).index_add_(0, cluster, values)
        counts = torch.bincount(cluster, minlength=k)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids, nearest(centroids)


class KMeans(SparseCompressor):
    """``compress=kmeans``: per-layer k-means weight sharing over the non-zero weights, with
    ``linear_bits``/``conv_bits``-bit codes (2**bits − 1 shared values plus the zero) and at
    most ``iterations`` Lloyd iterations. Biases are not shared (Deep Compression)."""

    def __init__(self, linear_bits: int = 5, conv_bits: int = 8, iterations: int = 100,
                 layers: str = "all", skip_first: bool = False, skip_last: bool = False,
                 entropy: str = "none") -> None:
        super().__init__(layers=layers, skip_first=skip_first, skip_last=skip_last,
                         entropy=entropy)
        check_range("compress.linear_bits", linear_bits, 1, 16, integer=True)
        check_range("compress.conv_bits", conv_bits, 1, 16, integer=True)
        check_range("compress.iterations", iterations, 1, integer=True)
        self.linear_bits, self.conv_bits = int(linear_bits), int(conv_bits)
        self.iterations = int(iterations)

    @torch.no_grad()
    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        report: Report = {}
        for name, layer in self.select(model):
            bits = self.linear_bits if isinstance(layer, nn.Linear) else self.conv_bits
            w = layer.weight
            kept = w != 0
            if kept.any():
                centroids, cluster = kmeans_1d(w[kept], 2**bits - 1, self.iterations)
                w[kept] = centroids[cluster]
            report[name] = {"bits": bits, "shared_values": int(w[kept].unique().numel()),
                            "nonzero_fraction": nonzero_fraction(w)}
        return model, report
