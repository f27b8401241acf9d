"""The compact table printed at the end of a run (the same figures as results.json), and
the verdict on those figures that the run and ``compaware report`` share: whether the run
collapsed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

# How many points above chance (100 / classes %) a final accuracy still counts as chance. A
# model that answers one class for every input scores that class's share of the test set,
# which an unbalanced split puts above 100 / classes (digits' 360 test images: up to 14.2 %
# for 10 classes); a model that learned anything scores far higher. 5 points catch the
# former and leave the latter alone.
CHANCE_MARGIN = 5.0


def final_accuracy(accuracy: dict) -> float | None:
    """The accuracy of the model the run ships (``accuracy`` as in results.json): fine-tuned,
    or compressed when not fine-tuned."""
    finetuned = accuracy.get("finetuned")
    return finetuned if finetuned is not None else accuracy.get("compressed")


def collapse_reason(results: dict, dead_layers: Sequence[str] = ()) -> str | None:
    """Why the run's final model collapsed, or None: its accuracy within
    :data:`CHANCE_MARGIN` points of chance (``config.data.num_classes``; not judged without
    it), or ``dead_layers`` (:func:`compaware.layers.dead_layers`). A collapsed run's
    compression ratios are no trade-off: nothing was kept to trade against."""
    reasons = []
    classes = ((results.get("config") or {}).get("data") or {}).get("num_classes")
    final = final_accuracy(results.get("accuracy") or {})
    if classes and final is not None and final <= 100 / classes + CHANCE_MARGIN:
        reasons.append(f"final accuracy {final:.2f} % is within {CHANCE_MARGIN:g} points of "
                       f"chance ({100 / classes:.2f} %)")
    if dead_layers:
        reasons.append(f"no units or an all-zero weight in {', '.join(dead_layers)}")
    return "; ".join(reasons) or None


def collapse_verdict(results: dict, dead_layers: Sequence[str]) -> dict:
    """results.json's ``collapsed`` (bool) and ``collapse_reason`` (:func:`collapse_reason`,
    None when not collapsed), with a warning in the log when collapsed."""
    reason = collapse_reason(results, dead_layers)
    if reason:
        log.warning("The run collapsed: %s. Its compression ratios say nothing about a "
                    "trade-off; compaware report keeps it off the Pareto frontiers.", reason)
    return {"collapsed": reason is not None, "collapse_reason": reason}


def _ratio(dense: float | None, compressed: float | None) -> str:
    if not dense or not compressed:
        return ""
    return f"{dense / compressed:.2f}×"


def _cell(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def format_summary(results: dict) -> str:
    """Rows of dense → compressed → fine-tuned, with dense/compressed ratios (for latency:
    the speed-up; for parameters, of the modules' counts, then of the compressed model's
    non-zeros), ``*`` on a latency whose runs spread wide, the budget asked and reached
    (``compress.target``), and COLLAPSED with the reason for a collapsed run."""
    acc = results["accuracy"]
    rows = [("accuracy (%)", _cell(acc["dense"]), _cell(acc["compressed"]),
             _cell(acc["finetuned"]), "")]
    for key, label in (("params", "parameters"), ("macs", "MACs"), ("bytes", "bytes (file)")):
        dense, compressed = results[key]["dense"], results[key]["compressed"]
        rows.append((label, _cell(dense), _cell(compressed), "", _ratio(dense, compressed)))
        nonzero = (results.get("compression") or {}).get("nonzero_params")
        if key == "params" and nonzero is not None:  # dense parameters / compressed non-zeros
            rows.append(("  non-zero", "", _cell(nonzero), "", _ratio(dense, nonzero)))
    noisy = False  # a latency whose runs spread wide (compaware/deploy/bench.py)
    for device, latency in results["latency_ms"].items():
        if latency is None:
            continue
        for key, size in (("batch_1", 1), ("batch_N", latency["batch_size"])):
            dense, compressed = latency[key]["dense"], latency[key]["compressed"]
            wide = (latency.get("wide_spread") or {}).get(key)
            label = f"{device} ms, batch {size}" + (" *" if wide else "")
            noisy = noisy or bool(wide)
            rows.append((label, _cell(dense, 3), _cell(compressed, 3), "",
                         _ratio(dense, compressed)))
    header = ("", "dense", "compressed", "fine-tuned", "ratio")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items())
    threads = next((lat["threads"] for lat in results["latency_ms"].values() if lat), None)
    lines.append(f"seconds: {seconds}" + (f"; latency with {threads} CPU threads" if threads
                                          else ""))
    if noisy:
        lines.append("* its runs spread wide (a busy machine?): distrust this median; "
                     "see latency_ms.<form>.spread")
    budget = ((results.get("compression") or {}).get("details") or {}).get("budget")
    if budget:  # compress.target: what was asked next to what was reached
        lines.append(f"budget: {budget['kind']} {budget['target']:g} asked, "
                     f"{budget['achieved']:.3g} reached"
                     + ("" if budget["reached"] else f" (not reached: {budget['reason']})"))
    if results.get("collapsed"):
        lines.append(f"COLLAPSED: {results['collapse_reason']}")
    return "\n".join(lines)
