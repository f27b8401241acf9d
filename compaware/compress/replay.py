"""The answers a latency-aware compression got from its timer, kept so that a resumed run
rebuilds the architecture it fine-tuned.

Latency-aware compression (compaware/compress/latency.py) decides on wall-clock timings, so
compressing the same weights twice can give two architectures: a resumed run that compressed
anew could rebuild a model its fine-tuning checkpoint does not fit. A run therefore records
every answer of its timer, in the order asked (:class:`RecordingTimer`; compaware/train.py
writes them to ``checkpoints/compression.json``), and a resumed run answers from the record
(:class:`ReplayingTimer`). Given the same weights and the same answers, compression takes the
same decisions. Each answer is kept with its question (the layer's kind, the shapes of its
parameters and of its input): a different question means the record is of another
compression, and the replay stops rather than answer it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from compaware.checkpoint import save_json
from compaware.compress.base import Compressor
from compaware.compress.latency import Timer
from compaware.config import UserError

log = logging.getLogger(__name__)


def question(layer: nn.Module, x: Tensor) -> str:
    """What a timer is asked, in words: ``Conv2d(8×1×5×5, 8) on 2×1×28×28``."""
    shapes = ", ".join("×".join(map(str, p.shape)) for p in layer.parameters())
    return f"{type(layer).__name__}({shapes}) on {'×'.join(map(str, x.shape))}"


class RecordingTimer:
    """``timer``, noting each question and its answer (seconds) in :attr:`answers`."""

    def __init__(self, timer: Timer) -> None:
        self.timer = timer
        self.answers: list[dict] = []

    def __call__(self, layer: nn.Module, x: Tensor) -> float:
        seconds = float(self.timer(layer, x))
        self.answers.append({"question": question(layer, x), "seconds": seconds})
        return seconds


class ReplayingTimer:
    """The ``answers`` of a :class:`RecordingTimer` (read from ``source``), given back in
    order, each to the question it was recorded for."""

    def __init__(self, answers: list[dict], source: Path) -> None:
        self.answers, self.source, self.asked = answers, source, 0

    def __call__(self, layer: nn.Module, x: Tensor) -> float:
        asked = question(layer, x)
        recorded = (self.answers[self.asked]["question"] if self.asked < len(self.answers)
                    else "nothing more")
        if asked != recorded:
            raise self.mismatch(f"timing {self.asked + 1} asks for {asked}, but the record "
                                f"has {recorded}")
        self.asked += 1
        return self.answers[self.asked - 1]["seconds"]

    def check_all_asked(self) -> None:
        """Stop where compression ended before asking every recorded question."""
        if self.asked != len(self.answers):
            raise self.mismatch(f"compression asked {self.asked} of its "
                                f"{len(self.answers)} timings")

    def mismatch(self, what: str) -> UserError:
        return UserError(f"resume: compression does not replay the latency timings the "
                         f"interrupted run recorded in {self.source} ({what}): the trained "
                         f"weights or the code changed since. Start a new run (or delete the "
                         f"checkpoints/finetune.pt and compression.json of this one to "
                         f"compress and fine-tune anew).")


def timer_for(compressor: Compressor, record: Path, resume: bool,
              make_timer: Callable[[str], Timer]) -> Timer | None:
    """What a latency-aware compressor times its candidate layers with: when resuming a run
    that compressed already, the answers its timer gave then (``record``), so that the same
    architecture is rebuilt; otherwise ``make_timer(compress.latency_form)`` (a run's
    :class:`compaware.deploy.timing.LayerTimer`), its answers recorded. None for a compressor
    that times nothing."""
    if not compressor.latency_aware:
        return None
    if resume and record.exists():
        log.info("compress: replaying the latency timings recorded in %s", record)
        return ReplayingTimer(json.loads(record.read_text())["timings"], record)
    return RecordingTimer(make_timer(compressor.latency.latency_form))


def keep(timer: Timer | None, record: Path) -> None:
    """Write the answers of a recording timer to ``record`` (atomically), before fine-tuning
    checkpoints a model built on them; check that a replay used them all."""
    if isinstance(timer, RecordingTimer):
        save_json({"timings": timer.answers}, record)
    elif isinstance(timer, ReplayingTimer):
        timer.check_all_asked()
