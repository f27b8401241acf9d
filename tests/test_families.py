"""One torchvision classifier per family, compressed end to end; and compression that never
returns: stopped by ``compress_time_limit`` or by a preemption signal, with a results.json.

Each family's smallest model runs ``svd`` and ``prune`` on synthetic data at the smallest
image size it takes (docs/running.md, "torchvision families"). The default suite runs the
small ones; ``pytest -m slow`` the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compaware import rundir
from compaware.compress import Compressor
from compaware.config import UserError
from compaware.time_limit import TimeLimitExceeded, time_limit
from compaware.train import main, train
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def library_loop(marker: Path | None = None) -> None:
    """Forever, like a library's search that never returns to compaware and swallows every
    :class:`Exception` (a tracer trying another way)."""
    if marker is not None:
        marker.touch()
    while True:
        try:
            sum(range(1000))
        except Exception:  # what must not swallow the time limit or a signal
            pass


class Hang(Compressor):
    """A compressor stuck in :func:`library_loop` while compressing (``where=compress``) or
    while saving its file, in the benchmark stage (``where=save``); ``marker`` is touched
    when it gets there."""

    def __init__(self, where: str = "compress", marker: str | None = None) -> None:
        super().__init__()
        self.where, self.marker = where, Path(marker) if marker else None

    def compress(self, model):
        if self.where == "compress":
            library_loop(self.marker)
        return model, {}

    def save(self, model, run_dir):
        if self.where == "save":
            library_loop(self.marker)
        return None


def test_the_time_limit_stops_a_library_loop_that_swallows_exceptions():
    start = time.monotonic()
    with pytest.raises(TimeLimitExceeded) as stop, time_limit(0.3, "compression",
                                                             "compress_time_limit", "Do less."):
        library_loop()
    assert time.monotonic() - start < 5
    message = str(stop.value)
    assert message.startswith("compression ran past compress_time_limit=0.3 s")
    assert "in tests.test_families.library_loop" in message
    assert "Do less. compress_time_limit takes a number of seconds > 0, or null" in message
    assert "\n" not in message
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # the handler is gone after
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_no_time_limit_and_a_body_within_it_run_as_they_are():
    with time_limit(None, "compression", "compress_time_limit", ""):
        time.sleep(0.05)
    with time_limit(5, "compression", "compress_time_limit", ""):
        value = sum(range(10))
    assert value == 45 and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_compression_past_the_time_limit_leaves_a_failed_results_json(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg("compress=none", "compress._target_=tests.test_families.Hang",
                   "regularizer=none", "bench.latency=false", "compress_time_limit=0.5",
                   "schedule.epochs=0", "schedule.finetune_epochs=0", run_dir=run_dir)
    with pytest.raises(TimeLimitExceeded, match="compress_time_limit=0.5 s"):
        main(cfg)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["error"].startswith("compression ran past compress_time_limit=0.5 s")
    assert "Compress fewer layers" in results["error"]


def test_a_time_limit_that_is_not_a_positive_number_stops_at_start(make_cfg):
    with pytest.raises(UserError, match=r"compress_time_limit=0(\.0)? is out of range; "
                                        r"compress_time_limit takes a number > 0"):
        train(make_cfg("compress_time_limit=0"))


@pytest.mark.parametrize(("where", "stage"), [("compress", "compression"),
                                              ("save", "benchmark")])
def test_sigterm_stops_a_stage_stuck_in_a_library_at_once(tmp_path, where, stage):
    """SIGTERM while compressing or benchmarking (no step boundary to wait for): the run
    stops within seconds as ``preempted``, naming the stage."""
    run_dir, marker = tmp_path / "run", tmp_path / "stuck"
    command = [str(Path(sys.executable).with_name("compaware")), "train", "debug=fast",
               "regularizer=none", "compress=none", "compress._target_=tests.test_families.Hang",
               f"+compress.where={where}", f"+compress.marker={marker}", "bench.latency=false",
               "schedule.epochs=0", "schedule.finetune_epochs=0", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env)
    try:
        while job.poll() is None and not marker.exists():
            time.sleep(0.05)
        time.sleep(0.2)  # well inside the loop
        sent = time.monotonic()
        job.send_signal(signal.SIGTERM)
        output = job.communicate(timeout=60)[0]
    finally:
        job.kill()
    assert job.returncode == 0, output
    assert time.monotonic() - sent < 30
    assert "Traceback" not in output
    assert rundir.status(run_dir) == "preempted"
    error = json.loads((run_dir / "results.json").read_text())["error"]
    assert error.startswith(f"{stage}: preempted by SIGTERM"), error
