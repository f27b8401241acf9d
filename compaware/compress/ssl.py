"""``compress=ssl``: the savings only SSL's shape-wise and depth-wise groups make possible.

Zero residual branches are removed first (their convs go with them), then the remaining
layers with dead im2col columns compute only the live ones. Filter-wise rows and whole
channels change the neighbouring layers as well (BN, the next layer's inputs, residual
additions) and are removed by ``compress=prune``, which calls these two steps around its
own (:func:`~compaware.compress.depth.remove_zero_branches` before building its dependency
graph, :func:`~compaware.compress.shape.drop_dead_columns` after pruning).
"""

from __future__ import annotations

from torch import nn

from compaware.compress.base import Compressor, Report
from compaware.compress.depth import remove_zero_branches
from compaware.compress.latency import LatencyOptions
from compaware.compress.shape import drop_dead_columns
from compaware.config import check_range
from compaware.layers import LayerSelection


class ShapeDepth(Compressor):
    """Remove zero residual branches, then dead im2col columns of the selected layers.

    ``threshold``: a column or a branch counts as zero when every weight in it (for a branch:
    its last BN's γ and β) has |w| ≤ threshold. 0 (default) removes exact zeros only, which is
    what SSL's zeroing leaves, and changes no output. ``min_sparsity``: a layer is replaced
    only where at least this fraction of its columns is dead. ``latency_aware``: and only
    where its live-column version, timed at ``latency_batch`` samples of ``input_shape``
    in ``latency_form``, is faster than the layer (compaware/compress/latency.py), so that
    the MACs it reports removed are MACs that cost time.
    """

    def __init__(self, threshold: float = 0.0, *, min_sparsity: float = 0.0, layers: str = "all",
                 skip_first: bool = False, skip_last: bool = False,
                 input_shape: tuple[int, ...] | None = None, latency_aware: bool = False,
                 latency_batch: int = 32, latency_form: str = "eager") -> None:
        check_range("compress.threshold", threshold, 0)
        check_range("compress.min_sparsity", min_sparsity, 0, 1)
        self.threshold, self.min_sparsity = float(threshold), float(min_sparsity)
        self.select = LayerSelection("compress", layers, skip_first, skip_last)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.latency = LatencyOptions(latency_aware=latency_aware, latency_batch=latency_batch,
                                      input_shape=self.input_shape, latency_form=latency_form)

    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        report = remove_zero_branches(model, self.threshold)
        check = self.latency.latency_check(model, self.input_shape, self.timer)
        report.update(drop_dead_columns(model, self.select(model), threshold=self.threshold,
                                        min_sparsity=self.min_sparsity, check=check))
        return model, report
