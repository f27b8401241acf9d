"""`compaware report`: tables and Pareto plots from fake result trees and from a real sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from compaware.report import (
    ACCURACY_WINDOW,
    Run,
    distinguishing_settings,
    find_runs,
    main,
    method_colours,
    pareto_figure,
    pareto_front,
)
from tests.conftest import run_cli


def _fake_run(root: Path, name: str, regularizer: str, compress: str, acc: float,
              params: int, overrides: list[str] | None = None, status: str = "completed",
              **extra) -> Path:
    """A run directory with a results.json as `compaware train` writes it (before the
    ``collapsed`` record, unless ``extra`` adds it), 10 classes, 1000 dense parameters."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in overrides or []))
    results = {
        "status": status,
        "accuracy": {"pretrained": None, "dense": 98.0, "compressed": acc - 1, "finetuned": acc},
        "params": {"dense": 1000, "compressed": params},
        "macs": {"dense": 5000, "compressed": params * 4},
        "bytes": {"dense": 4000, "compressed": params * 4},
        "latency_ms": {"cpu": {"threads": 2, "batch_size": 32, "device": "cpu",
                               "batch_1": {"dense": 1.0, "compressed": 0.5},
                               "batch_N": {"dense": 8.0, "compressed": 2.0}}, "cuda": None},
        "efficiency": {"batch_1": 0.37, "batch_N": 0.81},
        "choices": {"regularizer": regularizer, "compress": compress, "model": "lenet5",
                    "data": "digits"},
        "config": {"data": {"name": "digits", "num_classes": 10},
                   "model": {"_target_": "x.LeNet5"}, "regularizer": {}, "compress": {}},
        **extra,
    }
    if status != "completed":
        results = {"status": status, "error": "regularizer.lam=-1 is out of range",
                   "config": results["config"]}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_a_collapsed_run_is_marked_and_on_no_frontier_and_no_plot_axis(tmp_path):
    _fake_run(tmp_path, "a", "sws", "quantize", 90.0, 100)
    _fake_run(tmp_path, "b", "sws", "quantize", 85.0, 50)
    _fake_run(tmp_path, "c", "sws", "quantize", 12.0, 1)  # older file: at chance by the rule
    _fake_run(tmp_path, "d", "sws", "quantize", 60.0, 2, collapsed=True,  # recorded by the run
              collapse_reason="no units or an all-zero weight in fc1")
    runs = find_runs([tmp_path])
    assert [r.collapsed for r in runs] == [False, False, True, True]
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "1000.00×" in md and "500.00×" in md  # in the table, marked …
    assert "12.00 % is within 5 points of chance (10.00 %)" in md and "all-zero weight in fc1" in md
    assert "| sws → quantize | 10.00× @ 90.00%, 20.00× @ 85.00% |" in md  # … on no frontier
    with open(tmp_path / "out" / "results.csv") as f:
        marked = {Path(r["run"]).name: bool(r["collapsed"]) for r in csv.DictReader(f)}
    assert marked == {"a": False, "b": False, "c": True, "d": True}

    fig = pareto_figure(runs, "digits", "lenet5", method_colours(["sws → quantize"]))
    params_axis = fig.axes[0]
    assert params_axis.get_xlim() == pytest.approx((10 / 1.25, 20 * 1.25))  # not to 1000×
    assert params_axis.get_ylim() == pytest.approx((84.5, 90.5))  # not down to 12 %
    assert all(max(line.get_xdata()) <= 20 for line in params_axis.lines)
    assert "2 collapsed run(s) left out" in fig.texts[0].get_text()


def test_a_run_far_below_the_best_does_not_stretch_the_accuracy_axis(tmp_path):
    _fake_run(tmp_path, "a", "lowrank", "svd", 90.0, 100)
    _fake_run(tmp_path, "b", "lowrank", "svd", 86.0, 50)
    _fake_run(tmp_path, "c", "lowrank", "svd", 61.0, 10)  # not collapsed, 29 points under
    fig = pareto_figure(find_runs([tmp_path]), "digits", "lenet5",
                        method_colours(["lowrank → svd"]))
    low, high = fig.axes[0].get_ylim()
    assert 90 - ACCURACY_WINDOW - 1 < low < 86 and high == pytest.approx(90 + 0.05 * 15)
    assert "1 run(s) more than 15 points under the best below the axis" in fig.texts[0].get_text()


def test_params_ratio_is_structural_and_the_non_zero_ratio_a_column_of_its_own(tmp_path):
    _fake_run(tmp_path, "ssl", "ssl", "prune", 90.0, 200,
              compression={"params_ratio": 10.8, "nonzero_fraction": 1 / 10.8})
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| params ratio | non-zero ratio |" in md
    assert "| 5.00× | 10.80× | 6.25× |" in md  # 1000 / 200 parameters, as the summary says
    assert "5.00× @ 90.00%" in md  # the frontier's ratio is the same
    with open(tmp_path / "out" / "results.csv") as f:
        row = next(csv.DictReader(f))
    ratios = ("params ratio", "non-zero ratio", "MACs ratio")
    assert [row[f"{c} (dense/compressed)"] for c in ratios] == ["5.0", "10.8", "6.25"]
    assert row["acc fine-tuned (%)"] == "90.0" and row["collapsed"] == ""


def test_the_plot_labels_each_point_and_gives_each_method_a_colour_of_its_own(tmp_path):
    methods = ["none", *(f"reg{i}" for i in range(10))]  # 11: more than matplotlib's cycle
    for regularizer in methods:
        for lam in (1, 2):
            _fake_run(tmp_path, f"{regularizer}_{lam}", regularizer, "svd", 90.0 - lam,
                      100 * lam, ["experiment=x", f"regularizer={regularizer}",
                                  f"regularizer.lam={lam}"])
    runs = find_runs([tmp_path])
    colours = method_colours(sorted({r.method for r in runs}))
    params_axis = pareto_figure(runs, "digits", "lenet5", colours).axes[0]
    assert sorted(t.get_text() for t in params_axis.texts) == ["lam=1"] * 11 + ["lam=2"] * 11
    assert len({line.get_color() for line in params_axis.lines}) == 11
    assert [line.get_linestyle() for line in params_axis.lines].count("--") == 1  # none → svd


@pytest.mark.parametrize("form, column", [("onnxruntime", "ORT"), ("inductor", "Inductor"),
                                          ("channels_last", "NHWC"),
                                          ("strided_pools", "Strided-pools"),
                                          ("fastest", "Fastest")])
def test_report_shows_a_deployed_form_s_efficiency_where_a_run_measured_it(tmp_path, form,
                                                                            column):
    _fake_run(tmp_path, "eager", "lowrank", "svd", 97.0, 100)
    measured = _fake_run(tmp_path, form, "lowrank", "svd", 96.0, 50, ["regularizer.lam=5"])
    results = json.loads((measured / "results.json").read_text())
    results[f"efficiency_{form}"] = {"batch_1": 0.93, "batch_N": 1.04}
    (measured / "results.json").write_text(json.dumps(results))
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"| {column} efficiency b1 | {column} efficiency bN |" in md
    assert "| 0.37 | 0.81 | 0.93 | 1.04 |" in md and "| 0.37 | 0.81 | — | — |" in md
    assert md.count("efficiency b1") == 2  # the eager column and this form's only
    with open(tmp_path / "out" / "results.csv") as f:
        assert {r[f"{column} efficiency bN (latency ratio/MACs ratio)"]
                for r in csv.DictReader(f)} == {"1.04", ""}


def test_the_latency_ratio_is_the_eager_forms_or_an_older_runs_cpu_one(tmp_path):
    """Runs record the eager form's latency as latency_ms.eager; runs written before the
    inference forms recorded it as latency_ms.cpu (the fake runs here)."""
    _fake_run(tmp_path, "older", "lowrank", "svd", 97.0, 100)
    newer = _fake_run(tmp_path, "newer", "lowrank", "svd", 97.0, 100)
    results = json.loads((newer / "results.json").read_text())
    results["latency_ms"] = {"eager": results["latency_ms"].pop("cpu"), "cuda": None}
    (newer / "results.json").write_text(json.dumps(results))
    runs = {run.path.name: run for run in find_runs([tmp_path])}
    for run in (runs["older"], runs["newer"]):
        assert run.latency_ratio("batch_1") == 2.0 and run.latency_ratio("batch_N") == 4.0


def test_pareto_front_keeps_only_undominated_points():
    points = [(2.0, 90.0), (4.0, 85.0), (3.0, 80.0), (1.0, 95.0), (4.0, 70.0)]
    assert pareto_front(points) == [(1.0, 95.0), (2.0, 90.0), (4.0, 85.0)]


def test_report_on_a_fake_sweep(tmp_path):
    sweep = tmp_path / "multirun"
    _fake_run(sweep, "0", "lowrank", "svd", 97.0, 100, ["experiment=x", "regularizer.lam=1"])
    _fake_run(sweep, "1", "lowrank", "svd", 95.0, 50, ["experiment=x", "regularizer.lam=5"])
    _fake_run(sweep, "2", "none", "svd", 96.0, 200,
              ["experiment=x", "regularizer=none", "compress.rank=8", "compress.target=null"])
    _fake_run(sweep, "3", "lowrank", "svd", 0, 0, ["regularizer.lam=-1"], status="failed")
    (sweep / "4" / ".hydra").mkdir(parents=True)  # a job that died before writing results

    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "lowrank → svd" in md and "none → svd" in md
    assert "10.00×" in md and "20.00×" in md  # params ratios 1000/100, 1000/50
    assert "| regularizer.lam=5 |" in md and "experiment=x" not in md  # what differs only
    assert "| 0.37 | 0.81 |" in md  # realization efficiency at batch 1 and batch N
    assert "ORT efficiency" not in md and "Inductor efficiency" not in md  # none measured
    assert "Failed or incomplete runs" in md and "out of range" in md and "no results.json" in md
    assert "20.00× @ 95.00%" in md  # on the lowrank frontier
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["method"] for r in rows} == {"lowrank → svd", "none → svd"}
    assert {r["overrides"] for r in rows} >= {"experiment=x regularizer.lam=5"}  # every one
    assert (tmp_path / "out" / "pareto_digits_lenet5.png").stat().st_size > 10_000


def test_settings_keep_only_what_differs_between_runs_of_a_method_on_a_dataset_and_model():
    common = "experiment=cmp model=lenet5 init_from=a/b regularizer=lowrank schedule.epochs=3"
    runs = [Run(Path(str(i)), "completed", model="lenet5", overrides=f"{common} {extra}")
            for i, extra in enumerate(("regularizer.lam=1", "regularizer.lam=5",
                                       "regularizer.lam=5 schedule.optimizer=adam"))]
    runs.append(Run(Path("3"), "completed", model="lenet300", overrides=common))
    assert [r.setting for r in distinguishing_settings(runs)] == [
        "regularizer.lam=1", "regularizer.lam=5", "regularizer.lam=5 schedule.optimizer=adam",
        ""]  # the lenet300 run has no other to differ from
    assert distinguishing_settings(runs[:1])[0].setting == ""


def test_report_refuses_an_empty_directory(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])


def test_report_on_a_real_tiny_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli("train", "-m", "debug=fast", "bench.latency=false", "regularizer=none,lowrank",
                  "compress.rank=2", "compress.target=null", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr
    runs = find_runs([sweep])
    assert [r.status for r in runs] == ["completed", "completed"]
    assert {r.method for r in runs} == {"none → svd", "lowrank → svd"}
    report = run_cli("report", str(sweep), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "2 runs (0 failed" in report.stdout
    assert (tmp_path / "report" / "pareto_digits_lenet5.png").exists()


def test_csv_has_plain_numbers_under_headers_naming_the_unit_and_settings_that_differ(tmp_path):
    """The Markdown shows 3.94×, the CSV 3.94 under ``(dense/compressed)``; a row's setting is
    what differs between the runs of its method: k-means runs fine-tuned alike differ in their
    bits only, not in the schedule a plain run of the same model lacks."""
    shared = ["experiment=cmp", "init_from=a/train.pt", "schedule.epochs=0",
              "schedule.optimizer=adam", "schedule.finetune_lr=1e-4"]
    _fake_run(tmp_path, "plain", "none", "none", 97.0, 1000, ["experiment=cmp"])
    for bits, params in ((2, 254), (5, 500)):
        _fake_run(tmp_path, f"kmeans_{bits}", "none", "kmeans", 96.0, params,
                  [*shared, "compress=kmeans", f"compress.linear_bits={bits}"])
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| compress.linear_bits=2 | 98.00 | 95.00 | 96.00 | 3.94× |" in md
    assert "schedule." not in md
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {Path(r["run"]).name: r for r in csv.DictReader(f)}
    assert rows["kmeans_2"]["params ratio (dense/compressed)"] == "3.937"
    assert rows["kmeans_2"]["acc dense (%)"] == "98.0"
    assert [rows[name]["setting"] for name in ("plain", "kmeans_2", "kmeans_5")] == [
        "", "compress.linear_bits=2", "compress.linear_bits=5"]
    assert "×" not in "".join(v for r in rows.values() for v in r.values())


def test_a_budget_and_what_it_reached_are_columns_where_a_run_had_one(tmp_path):
    _fake_run(tmp_path, "ratio", "none", "prune", 97.0, 500)
    budget = {"kind": "macs", "target": 0.25, "achieved": 0.2483, "reached": True}
    _fake_run(tmp_path, "budget", "none", "prune", 96.0, 250,
              ["compress.target=macs\\:0.25"],  # as a sweep's job records it
              compression={"details": {"budget": budget}})
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| compress.target=macs:0.25 |" in md  # as typed
    assert "| acc fine-tuned | budget | budget reached | params ratio |" in md
    assert "| 96.00 | macs:0.25 | 0.248 | 4.00× |" in md and "| 97.00 |  | — | 2.00× |" in md
    with open(tmp_path / "out" / "results.csv") as f:
        reached = {r["budget"]: r["budget reached (share of dense)"] for r in csv.DictReader(f)}
    assert reached == {"macs:0.25": "0.2483", "": ""}


def test_no_budget_columns_without_a_budget(tmp_path):
    _fake_run(tmp_path, "ratio", "none", "prune", 97.0, 500)
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert "budget" not in (tmp_path / "out" / "results.md").read_text()
