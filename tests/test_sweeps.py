"""Sweeps: the joblib launcher for parallel local runs, and Optuna search over a declared
objective."""

from __future__ import annotations

import json
import math

import yaml

from tests.conftest import run_cli


def test_joblib_launcher_runs_every_job(tmp_path):
    out = run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "debug=fast",
                  "bench.latency=false", "regularizer.lam=1,3", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    lams = sorted(json.loads((tmp_path / str(i) / "results.json").read_text())["config"]
                  ["regularizer"]["lam"] for i in (0, 1))
    assert lams == [1.0, 3.0]


def test_optuna_search_maximises_the_declared_objective(tmp_path):
    out = run_cli("train", "-m", "experiment=search_lowrank_lenet5", "hydra.sweeper.n_trials=2",
                  "debug=fast", "bench.latency=false", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"regularizer.lam", "compress.energy"}
    trials = [json.loads((tmp_path / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert best["best_value"] == max(t["objective"] for t in trials)
    for t in trials:  # objective = final accuracy + 2 × log2(params ratio)
        ratio = t["params"]["dense"] / t["params"]["compressed"]
        assert abs(t["objective"] - (t["accuracy"]["finetuned"] + 2 * math.log2(ratio))) < 1e-9
