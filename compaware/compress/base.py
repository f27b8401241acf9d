"""The compressor interface: a trained model in, a new and physically smaller model out.

A compressor never mutates the model it is given (training may go on with it) and
never leaves masks behind: what it removes is gone from the returned module, which
is made only of standard ``torch.nn`` layers and so saves, exports and runs without
compaware. It also returns a report of what it did per layer, which ends up in
``results.json`` under ``compression``.

Where each hook runs (see ``compaware/train.py``)::

    compressor.check_requires(regularizer.publishes, source)  # at start: can this pair run?
    compressed, report = compressor(trained model, regularizer.artifacts(model), timer)
    fine-tune compressed under compressor.finetune_constraint(compressed)
    compressor.save(compressed, run_dir)       # its own storage format, if it has one

Compressors know nothing of regularizers: what one needs from training (soft weight-sharing's
mixture) comes as a named artifact, listed in ``requires``. Nor do they know how a layer is
deployed: a latency-aware one (``latency_aware``) times its candidate layers with the
:data:`~compaware.compress.latency.Timer` it is handed (in a run a
``compaware.deploy.timing.LayerTimer`` in ``latency.latency_form``; in tests a fake clock; in
a resumed run the answers the interrupted run's compression got).

Weight sharing and unstructured pruning keep the architecture: their model is smaller in
storage, not in shape, so they own a file format (``save``) whose size is the reported
``bytes.compressed``, and a fine-tuning constraint that keeps the zeros and the sharing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compaware.compress.budget import Budget
from compaware.compress.latency import LatencyOptions, Timer
from compaware.config import UserError, check_range
from compaware.keep import KeepStructure

Report = dict[str, dict]
MAX_SEARCH_STEPS = 20  # candidates of an accuracy search, each one fine-tuning


@dataclass(frozen=True)
class AccuracySearch:
    """``compress.max_accuracy_drop`` and ``compress.search_steps``: the run tries up to
    ``steps`` budgets of ``kind``, the first at ``first`` (``compress.target``'s share), and
    keeps the strongest whose fine-tuned accuracy stays within ``max_drop`` points of the
    dense model's (compaware/tolerance.py)."""

    max_drop: float
    steps: int
    kind: str
    first: float

    @classmethod
    def of(cls, max_accuracy_drop: float | None, search_steps: int,
           budget: Budget | None) -> AccuracySearch | None:
        """The search a compressor with a ``compress.target`` was configured for, or None."""
        check_range("compress.search_steps", search_steps, 1, MAX_SEARCH_STEPS, integer=True)
        if max_accuracy_drop is None:
            return None
        check_range("compress.max_accuracy_drop", max_accuracy_drop, 0, 100)
        if budget is None:
            raise UserError(f"compress.max_accuracy_drop={max_accuracy_drop} searches the "
                            f"budgets of compress.target's kind, starting at its share, but "
                            f"compress.target is null: set it too (params:<share>, "
                            f"macs:<share> or bytes:<share>, e.g. compress.target=macs:0.5), "
                            f"or compress.max_accuracy_drop=null.")
        return cls(float(max_accuracy_drop), int(search_steps), budget.kind, budget.share)


class Compressor:
    """``compress=none``: an unchanged copy (the dense model, benchmarked as "compressed")."""

    requires: tuple[str, ...] = ()  # artifacts of training it needs (Regularizer.publishes)
    # The structure it takes out of a model (the vocabulary of Regularizer.leaves): "rank"
    # (zero singular values), "units" (zero output units); what training can steer toward.
    removes: tuple[str, ...] = ()
    latency: LatencyOptions | None = None  # compress.round_to and compress.latency_*, if taken
    timer: Timer | None = None  # the clock of the current call (use_timer)
    search: AccuracySearch | None = None  # compress.max_accuracy_drop, if taken

    def __call__(self, model: nn.Module, artifacts: dict | None = None,
                 timer: Timer | None = None) -> tuple[nn.Module, Report]:
        self.check_requires(tuple(artifacts or ()), "the artifacts given")
        self.prepare(artifacts or {})
        self.use_timer(timer)
        return self.compress(copy.deepcopy(model))

    def check_requires(self, published: tuple[str, ...], source: str) -> None:
        """Stop with a clear message when ``source`` (a regularizer) publishes less than this
        compressor requires: checked before training, not after it."""
        missing = [key for key in self.requires if key not in published]
        if missing:
            raise UserError(self.missing_message(missing, source))

    def missing_message(self, missing: list[str], source: str) -> str:
        return (f"{type(self).__name__} needs what training learned ({', '.join(missing)}), "
                f"but none of it comes from {source}.")

    @property
    def latency_aware(self) -> bool:
        """Whether ``compress`` times candidate layers, in ``latency.latency_form``: it then
        needs a timer."""
        return self.latency is not None and self.latency.latency_aware

    def use_timer(self, timer: Timer | None) -> None:
        """Take the clock ``compress`` times candidate layers with. A latency-aware compressor
        refuses to go without one: skipping the timing would report choices never made."""
        if self.latency_aware and timer is None:
            form = self.latency.latency_form
            raise UserError(f"{type(self).__name__} is latency-aware (compress.latency_aware="
                            f"true or a compress.target=latency:<share>) and times candidate "
                            f"layers, but was given no timer: pass "
                            f"one, e.g. compressor(model, timer=LayerTimer({form!r})) with "
                            f"compaware.deploy.timing.LayerTimer.")
        self.timer = timer

    def check_input(self, sample_shape: tuple[int, ...]) -> None:
        """Stop at start when ``compress.input_shape`` (what a compressor traces or times the
        model on) is not the shape of one sample of the data."""
        given = getattr(self, "input_shape", None)
        if given is not None and tuple(given) != tuple(sample_shape):
            raise UserError(f"compress.input_shape={list(given)} is not the shape of one "
                            f"sample of the data, {list(sample_shape)} (data.channels, "
                            f"data.image_size, data.image_size). The configs take it from the "
                            f"data: leave compress.input_shape out.")

    def prepare(self, artifacts: dict) -> None:
        """Read what ``compress`` needs from the artifacts of training (nothing here; soft
        weight-sharing's quantization reads its mixture)."""

    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        """Compress ``model`` (a private copy, free to modify) and report per layer."""
        return model, {}

    def finetune_constraint(self, model: nn.Module,
                            keep_zeros: bool = False) -> KeepStructure | None:
        """What fine-tuning ``model`` (this compressor's output) must preserve: here nothing,
        or with ``keep_zeros`` (``schedule.finetune_mask``) every exact zero of ``model``
        (SSL's frozen structure)."""
        return KeepStructure.zeros(model) if keep_zeros else None

    def save(self, model: nn.Module, run_dir: Path) -> dict | None:
        """Store ``model`` in this compressor's own format inside ``run_dir``; return what was
        written (``bytes`` becomes ``bytes.compressed``). None here: the standalone
        ``model_compressed.pt2`` is the stored model."""
        return None
