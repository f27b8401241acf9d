"""``compaware report <dir>...``: runs and sweeps → a paper-style table and Pareto curves.

It reads every ``results.json`` below the given directories (single runs and multirun
sweeps alike) and writes into ``--out``:

- ``results.md`` and ``results.csv``: one row per run (data, model, method, setting: what
  differs between the method's runs, accuracy dense → compressed → fine-tuned, the budget
  asked (``compress.target``) and the share of the dense model reached,
  params/non-zero/MACs/bytes/latency ratios, whether and why it collapsed), the Pareto
  frontier of each method, and the runs that failed or left no results; the CSV in plain
  numbers, its headers naming their unit (``params ratio (dense/compressed)``, ``acc dense
  (%)``), the Markdown with ``3.94×``;
- ``pareto_<data>_<model>.png``: final accuracy against the params, MACs and storage
  ratios, one line per method (its Pareto frontier), post-hoc baselines dashed, each point
  labelled with what differs between the method's runs.

A ratio is dense / compressed, so higher is smaller (or, for latency, faster). The params
ratio is structural (the modules' parameter counts), as the run's summary prints it; the
non-zero ratio counts the compressed model's non-zero parameters, where pruning or sharing
that keeps the architecture saves. A collapsed run (:func:`compaware.summary.collapse_reason`)
stays in the table, marked, but on no frontier or plot: its ratios trade nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from compaware.summary import CHANCE_MARGIN, collapse_reason, final_accuracy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
    overrides: str = ""  # the run's command-line overrides, from Hydra's record
    setting: str = ""  # those that tell it apart (distinguishing_settings)
    results: dict = field(default_factory=dict)
    error: str = ""

    @property
    def method(self) -> str:
        return f"{self.regularizer} → {self.compress}"

    @property
    def is_baseline(self) -> bool:
        return self.regularizer in BASELINE_REGULARIZERS

    @property
    def collapse_reason(self) -> str | None:
        """Why the run collapsed, None if it did not: as its results.json records, or for a
        file written before that record, by the same rule on its final accuracy."""
        if "collapsed" not in self.results:
            return collapse_reason(self.results)
        if not self.results["collapsed"]:
            return None
        return self.results.get("collapse_reason") or "collapsed"

    @property
    def collapsed(self) -> bool:
        """Such a run's ratios say nothing about a trade-off: it stays in the table but not on
        the curves."""
        return self.collapse_reason is not None

    @property
    def accuracy(self) -> float | None:
        """The accuracy the run ends with: fine-tuned, or compressed when not fine-tuned."""
        return final_accuracy(self.results.get("accuracy") or {})

    def ratio(self, key: str) -> float | None:
        """dense / compressed ``key`` (params, macs, bytes), as the run's summary prints it:
        for params, the modules' parameter counts (structural)."""
        section = self.results.get(key) or {}
        dense, compressed = section.get("dense"), section.get("compressed")
        return dense / compressed if dense and compressed else None

    @property
    def nonzero_ratio(self) -> float | None:
        """Dense parameters / the compressed model's non-zero parameters
        (``compression.params_ratio``, Han et al.'s definition): what pruning or sharing that
        keeps the architecture saves, which the structural params ratio does not see."""
        return (self.results.get("compression") or {}).get("params_ratio")

    @property
    def budget(self) -> dict:
        """The compressor's ``budget`` entry (``compress.target``: kind, target share,
        achieved share), empty for a run without one."""
        return ((self.results.get("compression") or {}).get("details") or {}).get("budget") or {}

    def latency_ratio(self, batch: str = "batch_N") -> float | None:
        """dense / compressed CPU latency in the eager form (``latency_ms.eager``; runs
        written before the inference forms recorded it as ``latency_ms.cpu``)."""
        latency = self.results.get("latency_ms") or {}
        eager = latency.get("eager") or latency.get("cpu")
        if not eager:
            return None
        times = eager[batch]
        return times["dense"] / times["compressed"] if times["compressed"] else None

    def efficiency(self, batch: str = "batch_N", section: str = "efficiency") -> float | None:
        """Realization efficiency: the run's ``efficiency`` entry (the eager form;
        ``efficiency_<form>``: in another form of ``bench.forms``, or ``efficiency_fastest``,
        where the run measured it), or for runs
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


def _overrides(run_dir: Path) -> str:
    """The command-line overrides of the run (what a sweep varied), from Hydra's record
    (empty where there is none or it cannot be read), as typed: a sweep records each job's
    value escaped (``compress.target=macs\\:0.25``)."""
    try:
        items = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        return " ".join(re.sub(r"\\(.)", r"\1", str(o)) for o in items
                        if not str(o).startswith("hydra"))
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return ""


def load_run(run_dir: Path) -> Run:
    """The run in ``run_dir``; one whose results.json cannot be read, or holds something
    other than a run's results, comes back with status ``unreadable`` and the reason, so
    that one damaged file costs its own row and not the report."""
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        return Run(run_dir, "missing", overrides=_overrides(run_dir),
                   error="no results.json (crashed, killed or still running)")
    try:
        return _run_from(run_dir, json.loads(results_file.read_bytes()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return Run(run_dir, "unreadable", overrides=_overrides(run_dir),
                   error=f"results.json: {e}")


def _run_from(run_dir: Path, results: object) -> Run:
    """The run ``results`` describes, every cell of its table row checked (raises
    ValueError, TypeError, KeyError or AttributeError where a field has the wrong type)."""
    if not isinstance(results, dict):
        raise TypeError(f"holds a JSON {type(results).__name__}, not a run's results")
    config, choices = results.get("config", {}), results.get("choices", {})
    model = _choice(choices, config, "model")
    if model == "torchvision" or "name" in (config.get("model") or {}):
        model = f"{model}:{config['model'].get('name')}"
    run = Run(run_dir, str(results.get("status", "completed")),
              data=str((config.get("data") or {}).get("name", "?")), model=model,
              regularizer=_choice(choices, config, "regularizer"),
              compress=_choice(choices, config, "compress"), overrides=_overrides(run_dir),
              results=results, error=str(results.get("error", "")))
    if run.status == "completed":
        for column, value in table_row(run).items():
            if column not in TEXT_COLUMNS and not _missing(value) and not _is_number(value):
                raise TypeError(f"{column} is {value!r}, not a number")
    return run


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Overrides the table shows in other columns (the groups) or that name a file, not a choice.
NOT_A_SETTING = ("data=", "model=", "regularizer=", "compress=", "init_from=")


def differing_overrides(overrides: list[list[str]]) -> list[list[str]]:
    """Each list of overrides cut to those that tell it apart from the other lists: an
    override stays where another list gives its key another value or none, and goes where
    every list has it (the sweep's common ground, e.g. ``experiment=``) or where it is in
    :data:`NOT_A_SETTING`. A lone list keeps nothing: there is nothing to tell apart."""
    values = [dict(o.partition("=")[::2] for o in items) for items in overrides]
    differ = {key for v in values for key in v if len({w.get(key) for w in values}) > 1}
    return [[o for o in items if o.partition("=")[0] in differ
             and not o.startswith(NOT_A_SETTING)] for items in overrides]


def _data_model_method(run: Run) -> tuple[str, str, str]:
    return run.data, run.model, run.method


def distinguishing_settings(runs: list[Run],
                            group: Callable[[Run], Hashable] = _data_model_method) -> list[Run]:
    """``runs`` with each ``setting`` set to the overrides that tell the run apart from the
    others of its ``group`` (by default those of the same method on its data and model, as the
    plots label their points; :func:`differing_overrides`), so a row reads
    ``regularizer.lam=5``, not every override the method's runs share (its schedule, an
    optimizer) nor those that only tell it from other methods, which its method column does."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, run in enumerate(runs):
        members[group(run)].append(i)
    settings = [""] * len(runs)
    for indices in members.values():
        cut = differing_overrides([runs[i].overrides.split() for i in indices])
        for i, items in zip(indices, cut, strict=True):
            settings[i] = " ".join(items)
    return [replace(run, setting=setting) for run, setting in zip(runs, settings, strict=True)]


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


# Efficiency in the inference forms a run may time besides eager (bench.forms, and
# bench.fastest: compaware/deploy/forms.py): column → (results.json section, batch); a column
# is shown where some run measured it.
DEPLOYED_COLUMNS = {f"{short} efficiency {b}": (f"efficiency_{form}", batch)
                    for form, short in (("channels_last", "NHWC"),
                                        ("strided_pools", "Strided-pools"),
                                        ("onnxruntime", "ORT"), ("inductor", "Inductor"),
                                        ("fastest", "Fastest"))
                    for b, batch in (("b1", "batch_1"), ("bN", "batch_N"))}
RATIO_COLUMNS = ("params ratio", "non-zero ratio", "MACs ratio", "storage ratio",
                 "latency ratio b1", "latency ratio bN")
# A budget's columns (compress.target) are shown where some run had one.
BUDGET_COLUMNS = ("budget", "budget reached")
COLUMNS = ("data", "model", "method", "setting", "acc dense", "acc compressed",
           "acc fine-tuned", *BUDGET_COLUMNS, *RATIO_COLUMNS, "efficiency b1", "efficiency bN",
           *DEPLOYED_COLUMNS, "collapsed", "overrides", "run")
CSV_ONLY = ("overrides", "run")  # long: the Markdown table leaves them out
# The CSV's headers name the unit of their plain numbers (the Markdown cells show it: 3.94×).
UNITS = {"acc dense": "%", "acc compressed": "%", "acc fine-tuned": "%",
         "budget reached": "share of dense",
         **dict.fromkeys(RATIO_COLUMNS, "dense/compressed"),
         **dict.fromkeys(("efficiency b1", "efficiency bN", *DEPLOYED_COLUMNS),
                         "latency ratio/MACs ratio")}
TEXT_COLUMNS = ("data", "model", "method", "setting", "budget", "collapsed", *CSV_ONLY)

Cell = str | float | None


def table_row(run: Run) -> dict[str, Cell]:
    """The run's cells as values: text, or numbers (None where not measured), formatted by
    the file they go to. ``collapsed`` is the reason, empty for a run that did not."""
    acc, budget = run.results.get("accuracy", {}), run.budget
    return {
        "data": run.data, "model": run.model, "method": run.method, "setting": run.setting,
        "acc dense": acc.get("dense"), "acc compressed": acc.get("compressed"),
        "acc fine-tuned": acc.get("finetuned"),
        "budget": f"{budget['kind']}:{budget['target']:g}" if budget else "",
        "budget reached": budget.get("achieved"),
        "params ratio": run.ratio("params"), "non-zero ratio": run.nonzero_ratio,
        "MACs ratio": run.ratio("macs"), "storage ratio": run.ratio("bytes"),
        "latency ratio b1": run.latency_ratio("batch_1"),
        "latency ratio bN": run.latency_ratio("batch_N"),
        "efficiency b1": run.efficiency("batch_1"), "efficiency bN": run.efficiency("batch_N"),
        **{column: run.efficiency(batch, section)
           for column, (section, batch) in DEPLOYED_COLUMNS.items()},
        "collapsed": run.collapse_reason or "", "overrides": run.overrides, "run": str(run.path),
    }


def _missing(value: Cell) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _markdown_cell(column: str, value: Cell) -> str:
    """Numbers to two decimals (a budget's share to three: it is met within 3 %), ratios
    with ×, — where not measured."""
    if isinstance(value, str):
        return value
    if _missing(value):
        return "—"
    if column == "budget reached":
        return f"{value:.3f}"
    return f"{value:.2f}" + ("×" if column in RATIO_COLUMNS else "")


def csv_header(column: str) -> str:
    """``params ratio`` → ``params ratio (dense/compressed)``: the column with its unit."""
    return f"{column} ({UNITS[column]})" if column in UNITS else column


def _csv_cell(value: Cell) -> str | float:
    """Plain numbers for spreadsheets (4 decimals), empty where not measured."""
    if isinstance(value, str):
        return value
    return "" if _missing(value) else round(value, 4)


def _markdown_table(rows: list[dict[str, str]], columns: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return lines


def _group_key(run: Run) -> tuple[str, str, bool, str]:
    return (run.data, run.model, not run.is_baseline, run.method)


def write_report(runs: list[Run], out: Path) -> list[Path]:
    """Write the tables and plots for ``runs`` into ``out``; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    done = sorted(distinguishing_settings([r for r in runs if r.status == "completed"]),
                  key=lambda r: (*_group_key(r), -(r.ratio("params") or 0)))
    failed = [r for r in runs if r.status != "completed"]
    rows = [table_row(r) for r in done]

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[csv_header(c) for c in COLUMNS])
        writer.writeheader()
        writer.writerows({csv_header(c): _csv_cell(v) for c, v in row.items()} for row in rows)

    md = ["# Results", "",
          "Ratios are dense / compressed (higher: smaller or faster); the params ratio counts "
          "the modules' parameters, the non-zero ratio the compressed model's non-zero ones. "
          "Accuracy is top-1 (%) on the test set; the fine-tuned column is the model that "
          "ships. Post-hoc baselines are the runs with regularizer "
          f"{', '.join(BASELINE_REGULARIZERS)}. The setting is what differs between the runs "
          "of a method on a dataset and model (results.csv has every override).", ""]
    measured = {c for row in rows for c in (*DEPLOYED_COLUMNS, *BUDGET_COLUMNS)
                if row[c] != "" and not _missing(row[c])}
    shown = tuple(c for c in COLUMNS if c not in CSV_ONLY
                  and (c not in (*DEPLOYED_COLUMNS, *BUDGET_COLUMNS) or c in measured))
    md += _markdown_table([{c: _markdown_cell(c, row[c]) for c in shown} for row in rows],
                          shown) if rows else ["No completed runs."]
    md += ["", "## Pareto frontier per method (final accuracy vs params ratio)", "",
           f"Collapsed runs (final accuracy within {CHANCE_MARGIN:g} points of chance, or a "
           "layer left with no units or an all-zero weight: the column collapsed says which) "
           "are left out of the frontiers and the plots.", ""]
    fronts = []
    for key in sorted({_group_key(r) for r in done}):
        group = [r for r in done if _group_key(r) == key and r.accuracy is not None
                 and not r.collapsed]
        points = [(r.ratio("params"), r.accuracy) for r in group if r.ratio("params")]
        front = ", ".join(f"{ratio:.2f}× @ {acc:.2f}%" for ratio, acc in pareto_front(points))
        front = front or "— (every run collapsed)"
        fronts.append({"data": key[0], "model": key[1], "method": key[3], "frontier": front})
    md += _markdown_table(fronts, ("data", "model", "method", "frontier")) if fronts else []
    if failed:
        md += ["", "## Failed or incomplete runs", ""]
        md += _markdown_table([{"run": str(r.path), "status": r.status, "setting": r.overrides,
                                "error": r.error.replace("|", "\\|").replace("\n", " ")[:300]}
                               for r in failed], ("run", "status", "setting", "error"))
    (out / "results.md").write_text("\n".join(md) + "\n")
    colours = method_colours(sorted({r.method for r in done}))
    plots = [plot_pareto(done, data, model, out, colours)
             for data, model in sorted({(r.data, r.model) for r in done})]
    return [out / "results.md", out / "results.csv", *plots]


def method_colours(methods: list[str]) -> dict[str, tuple]:
    """A colour for each of ``methods``, no two alike, the same in every plot of a report:
    matplotlib's qualitative tab10, tab20 for more methods, and beyond 20 evenly spaced
    colours of turbo (no qualitative map has more)."""
    import matplotlib

    if len(methods) > 20:
        turbo = matplotlib.colormaps["turbo"]
        return {m: turbo(i / (len(methods) - 1)) for i, m in enumerate(methods)}
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i) for i, m in enumerate(methods)}


# The axes span the runs shown, padded so points and their labels sit inside: accuracy by
# this share of its range (at least half a point), ratios by this factor (log axes).
ACCURACY_PAD, RATIO_PAD = 0.05, 1.25
# Runs more than this many points below the best stay in the table but below the accuracy
# axis: a trade that costs that much is not one to compare, and a single such run would
# squash every run worth comparing into a strip at the top.
ACCURACY_WINDOW = 15.0


def accuracy_limits(accuracies: list[float]) -> tuple[float, float]:
    """The y axis: a little below the lowest accuracy shown, but no lower than
    :data:`ACCURACY_WINDOW` points under the best, to a little above the best. Collapsed runs
    are not shown (a run at chance is collapsed by definition), so no outlier can stretch
    the axis down."""
    high = max(accuracies)
    low = max(min(accuracies), high - ACCURACY_WINDOW)
    pad = max(ACCURACY_PAD * (high - low), 0.5)
    return low - pad, high + pad


def ratio_limits(ratios: list[float]) -> tuple[float, float]:
    """An x axis (log): the range of the ratios shown, padded by :data:`RATIO_PAD` each way.
    A collapsed run's ratio (every weight zero: hundreds of ×) is not among them."""
    return min(ratios) / RATIO_PAD, max(ratios) * RATIO_PAD


def _point_label(setting: str) -> str:
    """``regularizer.lam=5 compress.rank=2`` → ``lam=5 rank=2``: short enough beside a dot."""
    return " ".join(o.partition("=")[0].rsplit(".", 1)[-1] + "=" + o.partition("=")[2]
                    for o in setting.split())


def pareto_figure(runs: list[Run], data: str, model: str,
                  colours: dict[str, tuple]) -> Figure:
    """Final accuracy against each compression ratio for one dataset and model: per method
    (in its colour from ``colours``) its Pareto frontier, dashed for post-hoc baselines,
    over its runs, each labelled with what differs between the method's runs; the axes fitted
    to the runs shown (:func:`accuracy_limits`, :func:`ratio_limits`). Collapsed runs are
    left out, and counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    mine = [r for r in runs if (r.data, r.model) == (data, model) and r.accuracy is not None]
    shown = distinguishing_settings([r for r in mine if not r.collapsed], lambda r: r.method)
    fig, axes = plt.subplots(1, len(RATIOS), figsize=(5 * len(RATIOS), 4), sharey=True)
    for ax, (key, label) in zip(axes, RATIOS, strict=True):
        plotted = [r for r in shown if r.ratio(key)]
        for method in sorted({r.method for r in plotted}):
            group = [r for r in plotted if r.method == method]
            points = [(r.ratio(key), r.accuracy) for r in group]
            style, colour = "--" if group[0].is_baseline else "-", colours[method]
            ax.plot(*zip(*pareto_front(points), strict=True), style, marker="o", color=colour,
                    label=method)
            ax.scatter(*zip(*points, strict=True), color=colour, alpha=0.3, s=12)
            for point, run in zip(points, group, strict=True):
                ax.annotate(_point_label(run.setting), point, xytext=(3, 3), fontsize=6,
                            textcoords="offset points", color=colour)
        ax.set_xscale("log")
        if plotted:
            ax.set_xlim(*ratio_limits([r.ratio(key) for r in plotted]))
        for axis_format in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis_format(FuncFormatter(_ratio_tick))
        ax.set_xlabel(f"{label} (dense / compressed)")
        ax.grid(True, which="both", alpha=0.3)
    if shown:
        axes[0].set_ylim(*accuracy_limits([r.accuracy for r in shown]))
    axes[0].set_ylabel("final accuracy (%)")
    axes[-1].legend(fontsize="small", loc="best")
    left_out = len(mine) - len(shown)
    floor = max((r.accuracy for r in shown), default=0.0) - ACCURACY_WINDOW
    below = sum(r.accuracy < floor for r in shown)
    fig.suptitle(f"{model} on {data}: accuracy vs compression (Pareto frontier per method)"
                 + (f"; {left_out} collapsed run(s) left out" if left_out else "")
                 + (f"; {below} run(s) more than {ACCURACY_WINDOW:g} points under the best "
                    f"below the axis" if below else ""))
    fig.tight_layout()
    return fig


def plot_pareto(runs: list[Run], data: str, model: str, out: Path,
                colours: dict[str, tuple]) -> Path:
    """:func:`pareto_figure` written to ``out/pareto_<data>_<model>.png``."""
    fig = pareto_figure(runs, data, model, colours)
    import matplotlib.pyplot as plt  # after pareto_figure has chosen the backend

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
