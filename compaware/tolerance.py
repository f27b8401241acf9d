"""Accuracy tolerance: the strongest budget whose accuracy stays within
``compress.max_accuracy_drop`` points of the dense model's.

    compaware train compress=prune compress.target=macs:0.5 compress.max_accuracy_drop=1.0

In place of one compression and one fine-tuning, the run tries a series of budgets of
``compress.target``'s kind (:class:`~compaware.compress.base.AccuracySearch`): each candidate
is compressed from the same trained weights and fine-tuned for ``schedule.finetune_epochs``
(compaware/train.py's ``compress_and_finetune``), then judged by its accuracy after
fine-tuning (after compression with ``schedule.finetune_epochs=0``). The shares follow a
geometric bisection (:func:`bisect`): the first is the target's share, the next is halfway
in log scale towards :data:`FLOOR` after a candidate within the drop, towards 1 (the dense
model, within by definition) after one beyond it, for ``compress.search_steps`` candidates.
The run keeps the candidate within the drop that keeps the smallest share of the dense
cost (as achieved, not as asked); where none stays within, it keeps the dense model
itself, says so in a warning, and the candidates' fine-tuned weights stay in their
checkpoints.

Accuracy is judged on the test split, the only held-out data a run has: choosing on it
flatters the chosen candidate's accuracy, which is then no unbiased estimate (results.json
``search.judged_on`` says so).

Each candidate has its own folder, ``checkpoints/search/<n>/`` (its fine-tuning checkpoint,
its latency timings and, once judged, ``candidate.json``), so ``resume=true`` takes finished
candidates from their records without compressing or fine-tuning them again, continues an
interrupted one from its checkpoint, and, the shares being a function of the judgements,
tries the same series.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from compaware.checkpoint import save_json
from compaware.compress import Compressor, Report
from compaware.compress.base import AccuracySearch
from compaware.config import UserError, instantiate
from compaware.summary import final_accuracy

log = logging.getLogger(__name__)

FLOOR = 0.01  # the smallest share searched: 1 % of the dense model's cost
JUDGED_ON = "test split (the only held-out data: choosing on it flatters the accuracy)"


@dataclass
class Attempt:
    """One compression and its fine-tuning: the compressor, the model it made (fine-tuned),
    its report and its accuracy (%): ``compressed`` and ``finetuned`` (None without
    fine-tuning), as in results.json."""

    compressor: Compressor
    model: nn.Module
    report: Report
    accuracy: dict


# compress_and_finetune(compressor, folder of its files, fine-tuning stage name) → Attempt
Attempter = Callable[[Compressor, Path, str], Attempt]


def share_of(value: float) -> float:
    """A share as tried and recorded: four significant digits."""
    return float(f"{value:.4g}")


def bisect(judge: Callable[[float], bool], first: float, steps: int) -> list[float]:
    """The shares tried, in order: ``first``, then each the geometric mean of the strongest
    share judged beyond the drop so far (:data:`FLOOR` before any, or ``first`` if lower)
    and the weakest within (1 before any), for at most ``steps`` shares; ``judge(share)``
    says whether that share stays within. It stops early once the next share is one tried
    already (the bracket has closed at four digits)."""
    low, high, share, tried = min(FLOOR, first), 1.0, first, []
    while len(tried) < steps and share not in tried:
        tried.append(share)
        if judge(share):
            high = share
        else:
            low = share
        share = share_of(math.sqrt(low * high))
    return tried


def search(node: DictConfig, options: AccuracySearch, attempt: Attempter, *,
           dense: nn.Module, dense_accuracy: float, folder: Path, resume: bool
           ) -> tuple[Attempt, dict]:
    """Run the search of ``options`` (compressors built from ``node``, the ``compress``
    config, with each candidate's target); returns the kept attempt and results.json's
    ``search``: every candidate, in order, and the one chosen (its number, or None)."""
    candidates: list[dict] = []
    kept: dict[int, Attempt] = {}  # the best candidate so far, when tried in this process

    def candidate(share: float) -> Compressor:
        target = {"target": f"{options.kind}:{share:g}", "max_accuracy_drop": None}
        return instantiate(OmegaConf.merge(node, target), "compress")

    def judge(share: float) -> bool:
        number = len(candidates) + 1
        files = folder / str(number)
        record = files / "candidate.json"
        if resume and record.exists():
            entry = json.loads(record.read_text())
            if entry["share"] != share:
                raise UserError(f"resume: {record} is of a candidate at share {entry['share']}, "
                                f"but the search now asks {share}: the records are of another "
                                f"search. Start a new run.")
            log.info("search %d: taken from %s", number, record)
        else:
            tried = attempt(candidate(share), files, f"finetune/{number}")
            entry = describe(number, share, tried, dense_accuracy, options)
            save_json(entry, record)
            if entry["within"] and strongest([*candidates, entry]) == number:
                kept.clear()
                kept[number] = tried
        candidates.append(entry)
        log.info("search %d: %s:%g (achieved %s), accuracy %.2f against the dense model's "
                 "%.2f: %s %g points", number, options.kind, share, entry["achieved"],
                 entry["accuracy"]["judged"], dense_accuracy,
                 "within" if entry["within"] else "beyond", options.max_drop)
        return entry["within"]

    bisect(judge, options.first, options.steps)
    chosen = strongest(candidates)
    results = {"kind": options.kind, "max_accuracy_drop": options.max_drop,
               "judged_on": JUDGED_ON, "dense_accuracy": dense_accuracy,
               "candidates": candidates, "chosen": chosen}
    if chosen is None:
        log.warning("search: none of the %d budgets tried kept the accuracy within %g points "
                    "of the dense model's; the run keeps the dense model (each candidate's "
                    "fine-tuned weights are in %s/<n>/finetune.pt).", len(candidates),
                    options.max_drop, folder)
        return Attempt(Compressor(), copy.deepcopy(dense), {},
                       {"compressed": dense_accuracy, "finetuned": None}), results
    share = candidates[chosen - 1]["share"]
    log.info("search: keeps candidate %d of %d, %s:%g, judged on the %s", chosen,
             len(candidates), options.kind, share, JUDGED_ON)
    if chosen not in kept:  # judged before an interruption: rebuilt from its checkpoint
        kept[chosen] = attempt(candidate(share), folder / str(chosen),
                               f"finetune/{chosen}")
    return kept[chosen], results


def describe(number: int, share: float, tried: Attempt, dense_accuracy: float,
             options: AccuracySearch) -> dict:
    """A candidate as results.json ``search.candidates`` lists it."""
    judged = final_accuracy(tried.accuracy)
    budget = tried.report.get("budget", {})
    drop = round(dense_accuracy - judged, 6)  # 97.5 - 96.5 is 1.0000000000000142
    return {"number": number, "share": share, "achieved": budget.get("achieved"),
            "reached": budget.get("reached"), "accuracy": {**tried.accuracy, "judged": judged},
            "drop": drop, "within": drop <= options.max_drop}


def strongest(candidates: list[dict]) -> int | None:
    """The number of the candidate within the drop that keeps the smallest share (achieved,
    else asked), or None."""
    within = [c for c in candidates if c["within"]]
    if not within:
        return None
    best = min(within, key=lambda c: (c["achieved"] if c["achieved"] is not None else c["share"],
                                      c["share"]))
    return best["number"]
