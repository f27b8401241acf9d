"""A run directory after a start that went wrong: a start that failed or was killed before its
first checkpoint leaves the directory to the corrected command, and a refused process writes
nothing into a directory it does not own (``.hydra/`` and the log included)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from compaware.config import CONF_DIR, UserError
from compaware.train import train
from tests.conftest import run_cli
from tests.test_faults import RUN, assert_same_run, run_killed

pytestmark = pytest.mark.usefixtures("one_thread")


def _status(run_dir: Path) -> str:
    return json.loads((run_dir / "results.json").read_text())["status"]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


def test_a_refused_start_leaves_the_directory_to_the_corrected_command(tmp_path):
    refused = run_cli("train", "debug=fast", f"hydra.run.dir={tmp_path}", "schedule.lr=-1")
    assert refused.returncode != 0 and "schedule.lr" in refused.stderr
    assert _status(tmp_path) == "failed"  # a sweep keeps the trace …
    assert "the corrected command can use the same directory" in refused.stdout
    nothing = run_cli("train", "debug=fast", f"hydra.run.dir={tmp_path}", "resume=true")
    assert nothing.returncode != 0 and "nothing to continue" in nothing.stderr
    corrected = run_cli("train", "debug=fast", f"hydra.run.dir={tmp_path}")
    assert corrected.returncode == 0, corrected.stderr  # … and the directory is free again
    assert _status(tmp_path) == "completed"


def test_a_refused_process_writes_nothing_into_another_runs_directory(tmp_path):
    assert run_cli("train", "debug=fast", f"hydra.run.dir={tmp_path}").returncode == 0
    before = _files(tmp_path)
    assert ".hydra/overrides.yaml" in before and "train.log" in before
    intruder = run_cli("train", "debug=fast", f"hydra.run.dir={tmp_path}", "seed=3")
    assert intruder.returncode != 0 and "already holds a run" in intruder.stderr
    assert _files(tmp_path) == before


def test_a_run_killed_before_its_first_checkpoint_is_started_again_by_its_command(tmp_path):
    def make(*overrides: str, run_dir: Path):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=["debug=fast", f"paths.run_dir={run_dir}", *RUN,
                                                *overrides])

    reference = tmp_path / "reference"
    train(make(run_dir=reference))
    killed = tmp_path / "killed"
    assert run_killed(make(run_dir=killed), "torch.optim:SGD.step", 2) == -signal.SIGKILL
    assert not list(killed.rglob("*.pt"))
    with pytest.raises(UserError, match="nothing to continue"):
        train(make("resume=true", run_dir=killed))
    train(make(run_dir=killed))  # the original command
    assert_same_run(reference, killed)
