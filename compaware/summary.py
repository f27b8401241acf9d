"""The compact table printed at the end of a run (the same figures as results.json)."""

from __future__ import annotations


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
    the speed-up)."""
    acc = results["accuracy"]
    rows = [("accuracy (%)", _cell(acc["dense"]), _cell(acc["compressed"]),
             _cell(acc["finetuned"]), "")]
    for key, label in (("params", "parameters"), ("macs", "MACs"), ("bytes", "bytes (file)")):
        dense, compressed = results[key]["dense"], results[key]["compressed"]
        rows.append((label, _cell(dense), _cell(compressed), "", _ratio(dense, compressed)))
    for device, latency in results["latency_ms"].items():
        if latency is None:
            continue
        for key, size in (("batch_1", 1), ("batch_N", latency["batch_size"])):
            dense, compressed = latency[key]["dense"], latency[key]["compressed"]
            label = f"{device} ms, batch {size}"
            rows.append((label, _cell(dense, 3), _cell(compressed, 3), "",
                         _ratio(dense, compressed)))
    header = ("", "dense", "compressed", "fine-tuned", "ratio")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items())
    threads = next((lat["threads"] for lat in results["latency_ms"].values() if lat), None)
    layout = (results["latency_ms"]["cpu"] or {}).get("layout")  # bench.layout
    lines.append(f"seconds: {seconds}" + (f"; latency with {threads} CPU threads" if threads
                                          else "") + (f", {layout} layout" if layout else ""))
    return "\n".join(lines)
