"""The console script as a user meets it: Hydra's features (bad input: test_bad_input.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, run_cli


def test_compaware_train_runs_and_prints_the_summary(tmp_path):
    out = run_cli("train", "debug=fast", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "parameters" in out.stdout and "MACs" in out.stdout and "accuracy" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed"
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert f"run directory: {tmp_path}" in out.stdout
    log = (tmp_path / "train.log").read_text()
    assert "MACs" in log and f"run directory: {tmp_path}" in log  # the summary, kept


def test_python_dash_m_is_the_same_app():
    out = subprocess.run([sys.executable, "-m", "compaware.train", "--cfg", "job",
                          "regularizer.lam=0.25"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "lam: 0.25" in out.stdout and "_target_: compaware.regularizers.LowRank" in out.stdout


def test_help_lists_the_config_groups():
    out = run_cli("train", "--help")
    assert out.returncode == 0
    for group in ("data:", "model:", "regularizer:", "compress:", "schedule:", "bench:"):
        assert group in out.stdout


def test_bare_command_shows_usage():
    out = run_cli()
    assert out.returncode == 2 and "compaware train" in out.stdout
    assert run_cli("frobnicate").returncode == 2
