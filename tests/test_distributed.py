"""Beyond one process: DistributedDataParallel under torchrun (2 gloo processes on this CPU)
and Hydra's submitit launcher."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compaware.train import train
from tests.conftest import REPO

# Per-step proxes (many chances for the ranks to drift apart), no fine-tuning: what DDP does.
ARGS = ("data.limit=768", "schedule.max_steps_per_epoch=null", "schedule.epochs=2",
        "schedule.finetune_epochs=0", "regularizer.every=step", "regularizer.lam=0.5",
        "bench.latency=false")
COMPAWARE = Path(sys.executable).with_name("compaware")
pytestmark = pytest.mark.usefixtures("one_thread")  # as the subprocesses (OMP_NUM_THREADS)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_two_processes_train_as_one_with_the_same_global_batch(make_cfg, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(REPO / "tests" / "ddp_probe.py"), "debug=fast", *ARGS]
    out = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600,
                         env=ONE_THREAD)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    for rank in (0, 1):  # 12 steps per epoch, 2 epochs
        assert f"rank {rank}: weights identical on every rank after each of 24 " in out.stdout
    print("\n".join(line for line in out.stdout.splitlines() if "weights identical" in line))

    run_dirs = list(work.glob("outputs/*/*"))  # all ranks agreed on one directory
    assert len(run_dirs) == 1 and sorted(p.name for p in work.iterdir()) == ["outputs"]
    run_dir = run_dirs[0]
    assert len(list((run_dir / "tb").iterdir())) == 1  # only rank 0 writes events
    assert "rank 0 of 2" in (run_dir / "train.log").read_text()
    ddp = json.loads((run_dir / "results.json").read_text())

    single = train(make_cfg(*ARGS))
    print(f"dense accuracy: 2 processes × batch 32 {ddp['accuracy']['dense']:.2f} %, "
          f"1 process × batch 64 {single['accuracy']['dense']:.2f} %")
    assert abs(ddp["accuracy"]["dense"] - single["accuracy"]["dense"]) <= 1.0
    assert ddp["params"]["dense"] == single["params"]["dense"]


needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install '.[slurm]')")


@pytest.mark.slow
@needs_submitit
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    command = [str(COMPAWARE), "train", "-m", "hydra/launcher=submitit_local", "debug=fast",
               "bench.latency=false", "regularizer=none,lowrank", f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=ONE_THREAD)
    assert out.returncode == 0, out.stderr
    for job in (0, 1):
        assert json.loads((tmp_path / str(job) / "results.json").read_text())["status"] == \
            "completed"


def _processes_running(text: str) -> list[int]:
    """The processes whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            pass
    return found


@pytest.mark.slow
@needs_submitit
def test_a_job_preempted_under_submitit_is_requeued_and_resumes(make_cfg, tmp_path):
    """submitit's signal (USR2) reaches compaware first: checkpoint at the next step, then
    submitit's own handler requeues the job, which resumes and ends as an undisturbed run."""
    args = ("data.limit=768", "schedule.max_steps_per_epoch=null", "schedule.epochs=3",
            "schedule.finetune_epochs=1", "bench.latency=false")
    sweep = tmp_path / "sweep"
    command = [str(COMPAWARE), "train", "-m", "hydra/launcher=submitit_local", "debug=fast",
               *args, "seed=0", f"hydra.sweep.dir={sweep}"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=ONE_THREAD)
    log = sweep / "0" / "train.log"
    while job.poll() is None and "train epoch 1/3" not in (log.read_text() if log.exists()
                                                           else ""):
        time.sleep(0.1)
    task, = _processes_running(f"submitit.core._submit {sweep}")
    os.kill(task, signal.SIGUSR2)
    assert job.wait(timeout=600) == 0, job.stdout.read()
    text = log.read_text()
    assert "preempted by SIGUSR2" in text and "Requeued job" in text
    assert "was preempted: resuming" in text
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "completed"

    train(make_cfg(*args))
    for stage in ("train", "finetune"):
        a = torch.load(tmp_path / "run" / "checkpoints" / f"{stage}.pt")["model"]
        b = torch.load(sweep / "0" / "checkpoints" / f"{stage}.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage


@pytest.mark.parametrize(("amp", "device"), [
    ("bf16", "cpu"),
    pytest.param("fp16", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="fp16 autocast needs CUDA")),
])
def test_mixed_precision_with_channels_last_trains(make_cfg, tmp_path, amp, device):
    runs = {}
    for name, options in (("plain", ()), ("mixed", (f"schedule.amp={amp}",
                                                    "schedule.channels_last=true"))):
        results = train(make_cfg(f"device={device}", "schedule.finetune_epochs=0",
                                 "bench.latency=false", *options, run_dir=tmp_path / name))
        runs[name] = (results, torch.load(tmp_path / name / "checkpoints" / "train.pt")["model"])
    (plain, plain_weights), (mixed, mixed_weights) = runs["plain"], runs["mixed"]
    assert all(w.isfinite().all() for w in mixed_weights.values())
    assert not torch.equal(plain_weights["fc1.weight"], mixed_weights["fc1.weight"])  # it acted
    assert abs(plain["accuracy"]["dense"] - mixed["accuracy"]["dense"]) < 15
