"""Magnitude pruning (Han et al. 2015, "Learning both Weights and Connections"; docs/methods.md).

Per selected layer, every weight with |w| < q · std(W) becomes zero (biases are kept). The
layers keep their shape, so the saving is in storage: the pruned model is written in the
sparse format of :mod:`compaware.compress.storage` (float32 values, no codebook) and
fine-tuned with its zeros kept (Han retrains the survivors at 0.1× the lr, which is
``schedule.finetune_lr``'s default).

This is the first half of Deep Compression: ``compress=kmeans`` on the pruned model (a second
run with ``init_from=<this run>/checkpoints/finetune.pt``) shares the surviving weights and
keeps the zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from compaware.compress.base import Report
from compaware.compress.sparse import SparseCompressor, nonzero_fraction
from compaware.config import check_range


class Magnitude(SparseCompressor):
    """``compress=magnitude``: zero the weights below ``q`` × the layer's weight std."""

    shared = False

    def __init__(self, q: float = 1.0, layers: str = "all", skip_first: bool = False,
                 skip_last: bool = False, entropy: str = "none") -> None:
        super().__init__(layers=layers, skip_first=skip_first, skip_last=skip_last,
                         entropy=entropy)
        check_range("compress.q", q, 0)
        self.q = float(q)

    @torch.no_grad()
    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        report: Report = {}
        for name, layer in self.select(model):
            threshold = self.q * float(layer.weight.std())
            layer.weight.masked_fill_(layer.weight.abs() < threshold, 0.0)
            report[name] = {"threshold": threshold,
                            "nonzero_fraction": nonzero_fraction(layer.weight)}
        return model, report
