"""The compressor interface: a trained model in, a new and physically smaller model out.

A compressor never mutates the model it is given (training may go on with it) and
never leaves masks behind: what it removes is gone from the returned module, which
is made only of standard ``torch.nn`` layers and so saves, exports and runs without
compaware. It also returns a report of what it did per layer, which ends up in
``results.json`` under ``compression``.

Where each hook runs (see ``compaware/train.py``)::

    compressor.prepare(regularizer)            # read the trained regularizer's state, if needed
    compressed, report = compressor.compress(copy of the trained model)
    fine-tune compressed under compressor.finetune_constraint(compressed)
    compressor.save(compressed, run_dir)       # its own storage format, if it has one

Weight sharing and unstructured pruning keep the architecture: their model is smaller in
storage, not in shape, so they own a file format (``save``) whose size is the reported
``bytes.compressed``, and a fine-tuning constraint that keeps the zeros and the sharing.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from compaware.regularizers import FrozenZeros, Regularizer

Report = dict[str, dict]


class Compressor:
    """``compress=none``: an unchanged copy (the dense model, benchmarked as "compressed")."""

    def __call__(self, model: nn.Module,
                 regularizer: Regularizer | None = None) -> tuple[nn.Module, Report]:
        self.prepare(regularizer)
        return self.compress(copy.deepcopy(model))

    def prepare(self, regularizer: Regularizer | None) -> None:
        """Read what ``compress`` needs from the regularizer the model was trained with
        (nothing here; soft weight-sharing's quantization reads its mixture)."""

    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        """Compress ``model`` (a private copy, free to modify) and report per layer."""
        return model, {}

    def finetune_constraint(self, model: nn.Module, keep_zeros: bool = False) -> Regularizer:
        """What fine-tuning ``model`` (this compressor's output) must preserve, as a
        regularizer for the fine-tuning stage: here nothing, or with ``keep_zeros``
        (``schedule.finetune_mask``) every exact zero of ``model`` (SSL's frozen structure)."""
        return FrozenZeros(model) if keep_zeros else Regularizer()

    def save(self, model: nn.Module, run_dir: Path) -> dict | None:
        """Store ``model`` in this compressor's own format inside ``run_dir``; return what was
        written (``bytes`` becomes ``bytes.compressed``). None here: the standalone
        ``model_compressed.pt2`` is the stored model."""
        return None
