"""`compaware report`: tables and Pareto plots from fake result trees and from a real sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from compaware.report import Run, distinguishing_settings, find_runs, main, pareto_front
from tests.conftest import run_cli


def _fake_run(root: Path, name: str, regularizer: str, compress: str, acc: float,
              params: int, overrides: list[str] | None = None, status: str = "completed") -> Path:
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
        "config": {"data": {"name": "digits"}, "model": {"_target_": "x.LeNet5"},
                   "regularizer": {}, "compress": {}},
    }
    if status != "completed":
        results = {"status": status, "error": "regularizer.lam=-1 is out of range",
                   "config": results["config"]}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_a_run_at_chance_accuracy_stays_off_the_frontier(tmp_path):
    _fake_run(tmp_path, "ok", "sws", "quantize", 90.0, 100)
    collapsed = _fake_run(tmp_path, "zero", "sws", "quantize", 10.0, 1)
    results = json.loads((collapsed / "results.json").read_text())
    results["config"]["data"]["num_classes"] = 10
    (collapsed / "results.json").write_text(json.dumps(results))
    assert [r.collapsed for r in find_runs([tmp_path])] == [False, True]
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "1000.00×" in md  # in the table …
    assert "10.00× @ 90.00%" in md and "1000.00× @" not in md  # … not on the frontier


@pytest.mark.parametrize("form, column", [("onnxruntime", "ORT"), ("inductor", "Inductor")])
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
        assert {r[f"{column} efficiency bN"] for r in csv.DictReader(f)} == {"1.04", "—"}


def test_pareto_front_keeps_only_undominated_points():
    points = [(2.0, 90.0), (4.0, 85.0), (3.0, 80.0), (1.0, 95.0), (4.0, 70.0)]
    assert pareto_front(points) == [(1.0, 95.0), (2.0, 90.0), (4.0, 85.0)]


def test_report_on_a_fake_sweep(tmp_path):
    sweep = tmp_path / "multirun"
    _fake_run(sweep, "0", "lowrank", "svd", 97.0, 100, ["regularizer.lam=1"])
    _fake_run(sweep, "1", "lowrank", "svd", 95.0, 50, ["regularizer.lam=5"])
    _fake_run(sweep, "2", "none", "svd", 96.0, 200, ["regularizer=none", "compress.rank=8"])
    _fake_run(sweep, "3", "lowrank", "svd", 0, 0, ["regularizer.lam=-1"], status="failed")
    (sweep / "4" / ".hydra").mkdir(parents=True)  # a job that died before writing results

    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "lowrank → svd" in md and "none → svd" in md
    assert "10.00×" in md and "20.00×" in md  # params ratios 1000/100, 1000/50
    assert "regularizer.lam=5" in md
    assert "| 0.37 | 0.81 |" in md  # realization efficiency at batch 1 and batch N
    assert "ORT efficiency" not in md and "Inductor efficiency" not in md  # none measured
    assert "Failed or incomplete runs" in md and "out of range" in md and "no results.json" in md
    assert "20.00× @ 95.00%" in md  # on the lowrank frontier
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["method"] for r in rows} == {"lowrank → svd", "none → svd"}
    assert (tmp_path / "out" / "pareto_digits_lenet5.png").stat().st_size > 10_000


def test_settings_keep_only_what_tells_the_runs_apart():
    runs = [Run(Path(str(i)), "completed", setting=f"experiment=cmp model=lenet5 init_from=a/b "
                f"regularizer=lowrank regularizer.lam={lam}") for i, lam in enumerate((1, 5))]
    assert [r.setting for r in distinguishing_settings(runs)] == ["regularizer.lam=1",
                                                                  "regularizer.lam=5"]
    single = distinguishing_settings(runs[:1])[0]
    assert single.setting == "experiment=cmp regularizer.lam=1"  # nothing to compare with


def test_report_refuses_an_empty_directory(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])


def test_report_on_a_real_tiny_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli("train", "-m", "debug=fast", "bench.latency=false", "regularizer=none,lowrank",
                  "compress.rank=2", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr
    runs = find_runs([sweep])
    assert [r.status for r in runs] == ["completed", "completed"]
    assert {r.method for r in runs} == {"none → svd", "lowrank → svd"}
    report = run_cli("report", str(sweep), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "2 runs (0 failed" in report.stdout
    assert (tmp_path / "report" / "pareto_digits_lenet5.png").exists()
