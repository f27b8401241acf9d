"""Faults injected for real: SIGKILL anywhere, SIGTERM, NaN losses, a full disk, two runs in
one directory, a failed sweep job. Nothing may be lost and every resumed run must end with
exactly the weights and results of a run that was never disturbed."""

from __future__ import annotations

import errno
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

import pytest
import torch

from compaware import checkpoint, rundir
from compaware.config import UserError
from compaware.regularizers import Regularizer
from compaware.report import find_runs
from compaware.train import main, train
from tests.conftest import REPO

# Children are forked from a server that imported compaware but never ran torch: a fork of a
# process whose OpenMP threads have run hangs, and a fresh interpreter takes seconds to start.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["compaware.train", "tests.test_faults"])



pytestmark = pytest.mark.usefixtures("one_thread")  # and the children call set_num_threads(1)

# Every stage, short: pre-training (1 epoch), training (2), compression to rank 4, fine-tuning
# (2), export; debug=fast makes an epoch 4 steps.
RUN = ("schedule.pretrain_epochs=1", "schedule.epochs=2", "schedule.finetune_epochs=2",
       "compress.rank=4", "compress.target=null", "bench.latency=false")
DETERMINISTIC = ("accuracy", "params", "macs", "bytes", "structure", "compression", "regularizer")


def _weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {stage: checkpoint.load(run_dir / "checkpoints" / f"{stage}.pt")["model"]
            for stage in ("pretrain", "train", "finetune")}


def assert_same_run(a: Path, b: Path) -> None:
    for stage, weights in _weights(a).items():
        other = _weights(b)[stage]
        assert weights.keys() == other.keys()
        assert all(torch.equal(weights[k], other[k]) for k in weights), stage
    results = [json.loads((d / "results.json").read_text()) for d in (a, b)]
    for key in DETERMINISTIC:
        assert results[0][key] == results[1][key], key
    assert results[1]["status"] == "completed"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, object]:
    """An undisturbed run of RUN, and a ``make(*overrides, run_dir)`` for the same config."""
    from hydra import compose, initialize_config_dir

    from compaware.config import CONF_DIR

    def make(*overrides: str, run_dir: Path):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=["debug=fast", f"paths.run_dir={run_dir}", *RUN,
                                                *overrides])

    run_dir = tmp_path_factory.mktemp("reference")
    train(make(run_dir=run_dir))
    return run_dir, make


def _resolve(target: str) -> tuple[object, str]:
    """The object that holds ``target`` ("module:attribute.path") and the attribute's name."""
    module, path = target.split(":")
    *parents, name = path.split(".")
    owner = import_module(module)
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def _train_and_die(cfg, target: str, call: int, mid_write: bool,
                   replace: tuple[tuple[str, str], ...]) -> None:
    """In a forked child: run ``cfg``, and SIGKILL this process at the ``call``-th call of
    ``target`` ("module:attribute.path"), before the call or, with ``mid_write``, after writing
    half of what ``target`` (torch.save) would write. ``replace``: (target, stand-in) pairs
    set in the child first, e.g. a fake clock for the run's latency timer."""
    for where, stand_in in replace:
        setattr(*_resolve(where), getattr(*_resolve(stand_in)))
    owner, name = _resolve(target)
    original, calls = getattr(owner, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if mid_write:
                buffer = io.BytesIO()
                original(args[0], buffer)
                args[1].write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                args[1].flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, dying)
    torch.set_num_threads(1)
    train(cfg)
    os._exit(0)  # not killed: the test fails on the exit code


def run_killed(cfg, target: str, call: int, mid_write: bool = False,
               replace: tuple[tuple[str, str], ...] = ()) -> int:
    child = FORKS.Process(target=_train_and_die, args=(cfg, target, call, mid_write, replace))
    child.start()
    child.join(timeout=300)
    return child.exitcode


# (where, function whose n-th call dies, n, mid-write). With RUN: 4 pre-training steps, 8
# training steps, 8 fine-tuning steps; the prox shrinks 3 layers at each training epoch's end.
KILL_POINTS = [
    ("mid-epoch (training epoch 1, step 3)", "torch.optim:SGD.step", 7, False),
    ("during a proximal step (between two layers)",
     "compaware.regularizers.lowrank:shrink_singular_values", 2, False),
    ("during a checkpoint write (half written)", "torch:save", 3, True),
    ("during compression (between two layers)", "compaware.compress.svd:factorize", 2, False),
    ("during fine-tuning (epoch 1, step 3)", "torch.optim:SGD.step", 15, False),
    ("during the export of the compressed model", "compaware.deploy.bench:export_model", 2, False),
]


@pytest.mark.parametrize(("where", "target", "call", "mid_write"), KILL_POINTS,
                         ids=[point[0] for point in KILL_POINTS])
def test_sigkill_anywhere_then_resume_ends_exactly_as_an_undisturbed_run(
        reference, tmp_path, where, target, call, mid_write):
    reference_dir, make = reference
    assert run_killed(make(run_dir=tmp_path), target, call, mid_write) == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists()
    train(make("resume=true", run_dir=tmp_path))
    assert_same_run(reference_dir, tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))  # a later write cleared what the kill left


class PairClock:
    """A fake :class:`~compaware.deploy.timing.LayerTimer`: seconds = the layer's parameters,
    × ``factor`` for a factorized pair. At 20 only the largest layers gain from SVD; at 0
    every pair is faster, so the same weights compress to another architecture."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, layer: torch.nn.Module, x: torch.Tensor) -> float:
        size = sum(p.numel() for p in layer.parameters())
        return size * (self.factor if isinstance(layer, torch.nn.Sequential) else 1)


def slow_pairs(form: str) -> PairClock:
    """The run's timer in the killed child (``run_killed``'s stand-in for LayerTimer)."""
    return PairClock(20)


def test_a_latency_aware_run_resumed_in_fine_tuning_rebuilds_the_architecture_it_timed(
        reference, tmp_path, monkeypatch):
    """Killed in fine-tuning. The timings are wall-clock: the resumed run's timer (here
    another fake clock) would
    decide otherwise. The run replays the answers recorded in checkpoints/compression.json,
    and ends exactly as the undisturbed run; without the record the rebuilt model does not fit
    the fine-tuning checkpoint, and the run says so."""
    import compaware.train as train_module

    _, make = reference
    aware = ("compress.latency_aware=true", "compress.latency_batch=2")
    monkeypatch.setattr(train_module, "LayerTimer", lambda form: PairClock(20))
    undisturbed = tmp_path / "undisturbed"
    train(make(*aware, run_dir=undisturbed))
    details = json.loads((undisturbed / "results.json").read_text())["compression"]["details"]
    assert details["fc1"]["factorized"] and not details["conv1"]["factorized"]

    killed = run_killed(make(*aware, run_dir=tmp_path / "run"), "torch.optim:SGD.step", 19,
                        replace=(("compaware.train:LayerTimer", "tests.test_faults:slow_pairs"),))
    assert killed == -signal.SIGKILL  # fine-tuning epoch 2, step 3 (RUN: 4 + 8 + 8 steps)
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "finetune.pt")["epoch"] == 1
    recorded = json.loads((tmp_path / "run" / "checkpoints" / "compression.json").read_text())
    assert len(recorded["timings"]) == 2 * 4 * 3  # 4 layers and their pairs, 3 rounds each
    assert not list(tmp_path.rglob("*.tmp"))

    monkeypatch.setattr(train_module, "LayerTimer", lambda form: PairClock(0))
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(tmp_path / "run", unrecorded)
    (unrecorded / "checkpoints" / "compression.json").unlink()
    with pytest.raises(UserError, match="rebuilt a model other than the one fine-tuning "
                                        "checkpointed.*conv1"):
        train(make(*aware, "resume=true", run_dir=unrecorded))

    train(make(*aware, "resume=true", run_dir=tmp_path / "run"))
    assert_same_run(undisturbed, tmp_path / "run")


def _save_forever(path: Path) -> None:
    for i in range(1, 10**9):
        checkpoint.save({"i": i, "w": torch.full((1_000_000,), float(i))}, path)


def test_a_checkpoint_killed_mid_write_is_never_truncated(tmp_path):
    path, rng, mid_write = tmp_path / "c.pt", random.Random(0), 0
    checkpoint.save({"i": 0, "w": torch.zeros(1_000_000)}, path)
    for _ in range(30):
        child = FORKS.Process(target=_save_forever, args=(path,))
        child.start()
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        mid_write += bool(list(tmp_path.glob(".c.pt.*.tmp")))
        state = checkpoint.load(path)  # the old checkpoint or the new one, never a mix
        assert torch.equal(state["w"], torch.full((1_000_000,), float(state["i"])))
    print(f"30 kills, {mid_write} of them during a write; every checkpoint loaded whole")
    assert mid_write >= 10


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes_by_itself(make_cfg,
                                                                            tmp_path):
    """Issue 8's preemption test: SIGTERM to a running `compaware train`, then the same
    command again (a requeued job) finishes with the weights of an undisturbed run."""
    args = ("debug=fast", "data.limit=768", "schedule.max_steps_per_epoch=null",
            "schedule.epochs=3", "schedule.finetune_epochs=1", "bench.latency=false")
    undisturbed = tmp_path / "undisturbed"
    with_signal = tmp_path / "preempted"
    train(make_cfg(*args, run_dir=undisturbed))
    command = [str(Path(sys.executable).with_name("compaware")), "train", *args,
               f"hydra.run.dir={with_signal}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in this process (one_thread)
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env)
    log = with_signal / "train.log"
    while job.poll() is None and "train epoch 1/3" not in (log.read_text() if log.exists()
                                                           else ""):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output
    assert "Traceback" not in output
    assert rundir.status(with_signal) == "preempted"
    stopped = {p.stem: checkpoint.load(p) for p in (with_signal / "checkpoints").glob("*.pt")}
    (stage, state), = [(s, c) for s, c in stopped.items() if "progress" in c]
    print(f"SIGTERM landed in {stage} epoch {state['epoch'] + 1}, after batch "
          f"{state['progress']['batches']}: {output.strip().splitlines()[-1]}")

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                           env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "preempted: resuming" in (with_signal / "train.log").read_text()
    for name in ("train", "finetune"):
        a = checkpoint.load(undisturbed / "checkpoints" / f"{name}.pt")["model"]
        b = checkpoint.load(with_signal / "checkpoints" / f"{name}.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert rundir.status(with_signal) == "completed"


class NanAt(Regularizer):
    """No penalty, except NaN for ``times`` calls from the ``at``-th (a poisoned batch)."""

    def __init__(self, at: int, times: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at, self.times, self.calls = at, times, 0

    def penalty(self, model):
        self.calls += 1
        zero = super().penalty(model)
        return zero + float("nan") if self.at <= self.calls < self.at + self.times else zero


def _poisoned(make, run_dir: Path, at: int, times: int = 1, *overrides: str):
    return make("schedule.pretrain_epochs=0", "regularizer=none",
                "regularizer._target_=tests.test_faults.NanAt", f"+regularizer.at={at}",
                f"+regularizer.times={times}", *overrides, run_dir=run_dir)


def test_nan_stops_naming_the_step_and_the_intact_last_checkpoint(reference, tmp_path):
    _, make = reference
    with pytest.raises(UserError) as stop:
        train(_poisoned(make, tmp_path, at=6))  # epoch 2, step 2
    message = str(stop.value)
    assert "train 2/2" in message and "step 2" in message and "nan" in message
    assert f"{tmp_path / 'checkpoints' / 'train.pt'}, is intact" in message
    assert "schedule.on_nan" in message
    saved = checkpoint.load(tmp_path / "checkpoints" / "train.pt")
    assert saved["epoch"] == 1 and all(v.isfinite().all() for v in saved["model"].values())


def test_on_nan_skip_batch_skips_it_and_goes_on(reference, tmp_path, caplog):
    _, make = reference
    caplog.set_level(logging.INFO)
    results = train(_poisoned(make, tmp_path, 6, 1, "schedule.on_nan=skip_batch"))
    assert results["status"] == "completed"
    assert "skipped batch 2" in caplog.text and "non-finite batches skipped: 1" in caplog.text
    weights = checkpoint.load(tmp_path / "checkpoints" / "train.pt")["model"]
    assert all(v.isfinite().all() for v in weights.values())


def test_on_nan_restore_retries_the_epoch_at_half_the_lr(reference, tmp_path, caplog):
    _, make = reference
    train(_poisoned(make, tmp_path / "clean", 10**9))
    train(_poisoned(make, tmp_path / "restored", 6, 1, "schedule.on_nan=restore"))
    assert "retrying at lr" in caplog.text
    lr = [checkpoint.load(tmp_path / d / "checkpoints" / "train.pt")["scheduler"]["base_lrs"][0]
          for d in ("clean", "restored")]
    assert lr[1] == pytest.approx(lr[0] / 2)


def test_on_nan_restore_gives_up_after_three_retries(reference, tmp_path):
    _, make = reference
    with pytest.raises(UserError, match="training diverged"):
        train(_poisoned(make, tmp_path, 6, 10**6, "schedule.on_nan=restore"))


@pytest.mark.parametrize("on_nan", ["stop", "skip_batch"])
def test_an_absurd_lr_with_proximal_steps_stops_with_a_message(reference, tmp_path, on_nan):
    _, make = reference
    with pytest.raises(UserError, match="training diverged"):
        train(make("schedule.lr=1e12", "regularizer.every=step", f"schedule.on_nan={on_nan}",
                   "schedule.pretrain_epochs=0", "schedule.max_steps_per_epoch=30",
                   "data.limit=null", run_dir=tmp_path))


class _FullFile:
    """A file on a full disk: every write fails with ENOSPC (torch.save then raises a
    RuntimeError whose context is that OSError, exactly as on a real full disk)."""

    def __init__(self, f) -> None:
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()


def _full_disk_for(name: str):
    """``os.fdopen`` for compaware.checkpoint, giving a :class:`_FullFile` for ``name``."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        written = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        return _FullFile(f) if written.startswith(f".{name}.") else f

    return fdopen


@pytest.mark.parametrize("file", ["train.pt", "results.json"])
def test_a_full_disk_says_so_keeps_the_last_checkpoint_and_the_run_resumes(
        reference, tmp_path, monkeypatch, file):
    reference_dir, make = reference
    real_save, saves = checkpoint.save, []

    def save(state, path):  # the disk fills up after training's first epoch
        saves.append(path)
        if Path(path).name == "train.pt" and len(saves) == 3:
            monkeypatch.setattr(checkpoint.os, "fdopen", _full_disk_for(file))
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(UserError) as full:
        train(make(run_dir=tmp_path))
    assert f"cannot write {tmp_path}" in str(full.value) and file in str(full.value)
    assert "No space left on device" in str(full.value) and "resume=true" in str(full.value)
    assert not list(tmp_path.rglob("*.tmp"))
    if file == "train.pt":
        assert checkpoint.load(tmp_path / "checkpoints" / "train.pt")["epoch"] == 1
    monkeypatch.undo()  # space was freed
    train(make("resume=true", run_dir=tmp_path))
    assert_same_run(reference_dir, tmp_path)


def _train_quietly(cfg, results: Path) -> None:
    torch.set_num_threads(1)
    try:
        train(cfg)
        outcome = "completed"
    except UserError as e:
        outcome = str(e)
    results.write_text(outcome)
    os._exit(0)


def test_two_runs_started_together_never_share_a_directory(reference, tmp_path):
    _, make = reference
    cfg = make("schedule.pretrain_epochs=0", run_dir=tmp_path / "run")
    children = [FORKS.Process(target=_train_quietly, args=(cfg, tmp_path / f"outcome{i}"))
                for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=300)
    outcomes = [(tmp_path / f"outcome{i}").read_text() for i in range(2)]
    assert outcomes.count("completed") == 1, outcomes
    assert any("in use by another compaware process" in outcome for outcome in outcomes)


def test_a_failed_sweep_job_leaves_a_record_and_the_others_their_results(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(sys, "argv", ["compaware train", "-m", "debug=fast",
                                      "bench.latency=false", "regularizer.lam=0.5,-1,1",
                                      f"hydra.sweep.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code != 0
    jobs = [json.loads((tmp_path / str(i) / "results.json").read_text()) for i in range(3)]
    assert [job["status"] for job in jobs] == ["completed", "failed", "completed"]
    assert "regularizer.lam=-1" in jobs[1]["error"]
    assert jobs[1]["config"]["regularizer"]["lam"] == -1
    listed = {run.path.name: (run.status, run.error) for run in find_runs([tmp_path])}
    assert listed["1"][0] == "failed" and "regularizer.lam" in listed["1"][1]
    assert listed["0"][0] == listed["2"][0] == "completed"
