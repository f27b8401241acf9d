"""``compaware report <dir>...``: runs and sweeps → a paper-style table and Pareto curves.

It reads every ``results.json`` below the given directories (single runs and multirun
sweeps alike) and writes into ``--out``:

- ``results.md`` and ``results.csv``: one row per run (data, model, method, setting,
  accuracy dense → compressed → fine-tuned, params/MACs/bytes/latency ratios), the Pareto
  frontier of each method, and the runs that failed or left no results;
- ``pareto_<data>_<model>.png``: final accuracy against the params, MACs and storage
  ratios, one line per method (its Pareto frontier), post-hoc baselines dashed; runs at
  chance accuracy are left out of the frontiers and plots (their ratios are meaningless).

A ratio is dense / compressed, so higher is smaller (or, for latency, faster).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

BASELINE_REGULARIZERS = ("none", "l1", "l2")
RATIOS = (("params", "params ratio"), ("macs", "MACs ratio"), ("bytes", "storage ratio"))


@dataclass
class Run:
    """One run directory: its labels and, when it finished, its results."""

    path: Path
    status: str
    data: str = "?"
    model: str = "?"
    regularizer: str = "?"
    compress: str = "?"
    setting: str = ""
    results: dict = field(default_factory=dict)
    error: str = ""

    @property
    def method(self) -> str:
        return f"{self.regularizer} → {self.compress}"

    @property
    def is_baseline(self) -> bool:
        return self.regularizer in BASELINE_REGULARIZERS

    @property
    def collapsed(self) -> bool:
        """Final accuracy at chance (e.g. every weight quantized to zero): such a run's ratios
        say nothing about a trade-off, so it stays in the table but not on the curves."""
        classes = ((self.results.get("config") or {}).get("data") or {}).get("num_classes")
        return bool(classes) and self.accuracy is not None and self.accuracy <= 100 / classes + 1

    @property
    def accuracy(self) -> float | None:
        """The accuracy the run ends with: fine-tuned, or compressed when not fine-tuned."""
        acc = self.results.get("accuracy", {})
        return acc.get("finetuned") if acc.get("finetuned") is not None else acc.get("compressed")

    def ratio(self, key: str) -> float | None:
        """dense / compressed ``key`` (params, macs, bytes). Parameters count non-zeros where
        the run says (``compression.params_ratio``): pruned or shared weights that keep the
        architecture are smaller only in what is non-zero (Han et al.'s definition)."""
        counted = (self.results.get("compression") or {}).get("params_ratio")
        if key == "params" and counted:
            return counted
        section = self.results.get(key) or {}
        dense, compressed = section.get("dense"), section.get("compressed")
        return dense / compressed if dense and compressed else None

    def latency_ratio(self, batch: str = "batch_N") -> float | None:
        cpu = (self.results.get("latency_ms") or {}).get("cpu")
        if not cpu:
            return None
        times = cpu[batch]
        return times["dense"] / times["compressed"] if times["compressed"] else None

    def efficiency(self, batch: str = "batch_N", section: str = "efficiency") -> float | None:
        """Realization efficiency: the run's ``efficiency`` entry (``efficiency_onnxruntime``,
        ``efficiency_inductor``: in that form, where ``bench.<form>=true`` measured it), or for runs
        written before the entry existed, the same quotient (latency ratio ÷ MACs ratio) from
        their CPU numbers."""
        recorded = (self.results.get(section) or {}).get(batch)
        if recorded is not None or section != "efficiency":
            return recorded
        latency, macs = self.latency_ratio(batch), self.ratio("macs")
        return latency / macs if latency and macs else None


def _choice(choices: dict, config: dict, group: str) -> str:
    """The config option a run used (``regularizer=lowrank`` → "lowrank").

    Hydra records the choices; runs started without Hydra (tests, scripts) fall back to
    the class name of ``_target_``.
    """
    if group in choices:
        return str(choices[group])
    target = (config.get(group) or {}).get("_target_", "?")
    return target.rsplit(".", 1)[-1].lower()


def _setting(run_dir: Path) -> str:
    """The command-line overrides of the run (what a sweep varied), from Hydra's record."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return ""
    items = yaml.safe_load(overrides.read_text()) or []
    return " ".join(o for o in items if not o.startswith("hydra"))


def load_run(run_dir: Path) -> Run:
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        return Run(run_dir, "missing", setting=_setting(run_dir),
                   error="no results.json (crashed, killed or still running)")
    try:
        results = json.loads(results_file.read_text())
    except json.JSONDecodeError as e:
        return Run(run_dir, "unreadable", setting=_setting(run_dir), error=f"results.json: {e}")
    config, choices = results.get("config", {}), results.get("choices", {})
    model = _choice(choices, config, "model")
    if model == "torchvision" or "name" in (config.get("model") or {}):
        model = f"{model}:{config['model'].get('name')}"
    return Run(run_dir, results.get("status", "completed"),
               data=(config.get("data") or {}).get("name", "?"), model=model,
               regularizer=_choice(choices, config, "regularizer"),
               compress=_choice(choices, config, "compress"), setting=_setting(run_dir),
               results=results, error=results.get("error", ""))


# Overrides the table shows in other columns (the groups) or that name a file, not a choice.
NOT_A_SETTING = ("data=", "model=", "regularizer=", "compress=", "init_from=")


def distinguishing_settings(runs: list[Run]) -> list[Run]:
    """``runs`` with each setting cut to what tells the run apart: the overrides every run
    shares (the sweep's common ground, e.g. ``experiment=``) and those in
    :data:`NOT_A_SETTING` are left out, so a row reads ``regularizer.lam=5``."""
    split = [run.setting.split() for run in runs]
    common = set.intersection(*map(set, split)) if len(runs) > 1 else set()
    return [replace(run, setting=" ".join(o for o in items if o not in common
                                          and not o.startswith(NOT_A_SETTING)))
            for run, items in zip(runs, split, strict=True)]


def find_runs(dirs: list[Path]) -> list[Run]:
    """Every run below ``dirs``: folders with a results.json or Hydra's ``.hydra`` record."""
    run_dirs: set[Path] = set()
    for root in dirs:
        run_dirs.update(p.parent for p in root.rglob("results.json"))
        run_dirs.update(p.parent for p in root.rglob(".hydra") if p.is_dir())
    return [load_run(d) for d in sorted(run_dirs)]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (ratio, accuracy) points no other point beats on both, by increasing ratio."""
    front: list[tuple[float, float]] = []
    for ratio, acc in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((ratio, acc))
    return sorted(front)


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:{spec}}{suffix}"


# Efficiency in the deployment forms a run may also time (bench.onnxruntime, bench.inductor):
# column → (results.json section, batch); a column is shown where some run measured it.
DEPLOYED_COLUMNS = {f"{short} efficiency {b}": (f"efficiency_{form}", batch)
                    for form, short in (("onnxruntime", "ORT"), ("inductor", "Inductor"))
                    for b, batch in (("b1", "batch_1"), ("bN", "batch_N"))}
COLUMNS = ("data", "model", "method", "setting", "acc dense", "acc compressed",
           "acc fine-tuned", "params ratio", "MACs ratio", "storage ratio",
           "latency ratio b1", "latency ratio bN", "efficiency b1", "efficiency bN",
           *DEPLOYED_COLUMNS, "run")


def table_row(run: Run) -> dict[str, str]:
    acc = run.results.get("accuracy", {})
    return {
        "data": run.data, "model": run.model, "method": run.method, "setting": run.setting,
        "acc dense": _fmt(acc.get("dense")), "acc compressed": _fmt(acc.get("compressed")),
        "acc fine-tuned": _fmt(acc.get("finetuned")),
        "params ratio": _fmt(run.ratio("params"), suffix="×"),
        "MACs ratio": _fmt(run.ratio("macs"), suffix="×"),
        "storage ratio": _fmt(run.ratio("bytes"), suffix="×"),
        "latency ratio b1": _fmt(run.latency_ratio("batch_1"), suffix="×"),
        "latency ratio bN": _fmt(run.latency_ratio("batch_N"), suffix="×"),
        "efficiency b1": _fmt(run.efficiency("batch_1")),
        "efficiency bN": _fmt(run.efficiency("batch_N")),
        **{column: _fmt(run.efficiency(batch, section))
           for column, (section, batch) in DEPLOYED_COLUMNS.items()},
        "run": str(run.path),
    }


def _markdown_table(rows: list[dict[str, str]], columns: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return lines


def _group_key(run: Run) -> tuple[str, str, bool, str]:
    return (run.data, run.model, not run.is_baseline, run.method)


def write_report(runs: list[Run], out: Path) -> list[Path]:
    """Write the tables and plots for ``runs`` into ``out``; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    runs = distinguishing_settings(runs)
    done = sorted((r for r in runs if r.status == "completed"),
                  key=lambda r: (*_group_key(r), -(r.ratio("params") or 0)))
    failed = [r for r in runs if r.status != "completed"]
    rows = [table_row(r) for r in done]

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    md = ["# Results", "",
          "Ratios are dense / compressed (higher: smaller or faster). Accuracy is top-1 (%) on "
          "the test set; the fine-tuned column is the model that ships. Post-hoc baselines "
          f"are the runs with regularizer {', '.join(BASELINE_REGULARIZERS)}.", ""]
    measured = {c for row in rows for c in DEPLOYED_COLUMNS if row[c] != "—"}
    shown = tuple(c for c in COLUMNS[:-1] if c not in DEPLOYED_COLUMNS or c in measured)
    md += _markdown_table(rows, shown) if rows else ["No completed runs."]
    md += ["", "## Pareto frontier per method (final accuracy vs params ratio)", "",
           "Runs at chance accuracy (a collapsed model) are left out of the frontiers and "
           "the plots.", ""]
    fronts = []
    for key in sorted({_group_key(r) for r in done}):
        group = [r for r in done if _group_key(r) == key and r.accuracy is not None
                 and not r.collapsed]
        points = [(r.ratio("params"), r.accuracy) for r in group if r.ratio("params")]
        front = ", ".join(f"{ratio:.2f}× @ {acc:.2f}%" for ratio, acc in pareto_front(points))
        front = front or "— (every run at chance accuracy)"
        fronts.append({"data": key[0], "model": key[1], "method": key[3], "frontier": front})
    md += _markdown_table(fronts, ("data", "model", "method", "frontier")) if fronts else []
    if failed:
        md += ["", "## Failed or incomplete runs", ""]
        md += _markdown_table([{"run": str(r.path), "status": r.status, "setting": r.setting,
                                "error": r.error.replace("|", "\\|").replace("\n", " ")[:300]}
                               for r in failed], ("run", "status", "setting", "error"))
    (out / "results.md").write_text("\n".join(md) + "\n")
    plots = [plot_pareto(done, data, model, out)
             for data, model in sorted({(r.data, r.model) for r in done})]
    return [out / "results.md", out / "results.csv", *plots]


def plot_pareto(runs: list[Run], data: str, model: str, out: Path) -> Path:
    """Accuracy against each compression ratio for one dataset and model, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    runs = [r for r in runs if (r.data, r.model) == (data, model) and r.accuracy is not None
            and not r.collapsed]
    fig, axes = plt.subplots(1, len(RATIOS), figsize=(5 * len(RATIOS), 4), sharey=True)
    for ax, (key, label) in zip(axes, RATIOS, strict=True):
        for method in sorted({r.method for r in runs}):
            mine = [r for r in runs if r.method == method and r.ratio(key)]
            points = [(r.ratio(key), r.accuracy) for r in mine]
            if not points:
                continue
            style = "--" if mine[0].is_baseline else "-"
            front = pareto_front(points)
            line, = ax.plot(*zip(*front, strict=True), style, marker="o", label=method)
            ax.scatter(*zip(*points, strict=True), color=line.get_color(), alpha=0.3, s=12)
        ax.set_xscale("log")
        for axis_format in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis_format(FuncFormatter(_ratio_tick))
        ax.set_xlabel(f"{label} (dense / compressed)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("final accuracy (%)")
    axes[-1].legend(fontsize="small", loc="best")
    fig.suptitle(f"{model} on {data}: accuracy vs compression (Pareto frontier per method)")
    fig.tight_layout()
    path = out / f"pareto_{data}_{model.replace(':', '-')}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ratio_tick(value: float, _position: int) -> str:
    """Log-axis labels at 1, 2, 3 and 5 × 10^k only, written as plain ratios (20×)."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}×" if round(mantissa, 6) in (1, 2, 3, 5) else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compaware report",
        description="Tables and Pareto plots from run and multirun directories.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write results.md, results.csv and the plots "
                             "(default: <first dir>/report)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    runs = find_runs(args.dirs)
    if not runs:
        parser.error(f"no runs (results.json or .hydra/) below {', '.join(map(str, args.dirs))}")
    written = write_report(runs, args.out or args.dirs[0] / "report")
    failed = sum(r.status != "completed" for r in runs)
    print(f"{len(runs)} runs ({failed} failed or incomplete); wrote "
          + ", ".join(str(p) for p in written))
    return 0
