"""Bad command lines, systematically: each one stops at start with a non-zero exit, a message
naming the option and no traceback. The out-of-range, wrong-type and bad-choice rows for the
regularizers and compressors are discovered from compaware/conf/ and the constructors'
signatures, so a method merged later is covered without touching this file.

The hand-written rows run in this process through the very entry point the console script
uses (argv → Hydra → app → Hydra's error printing), which saves the seconds of a fresh
interpreter; two run as real subprocesses. The discovered rows, over a hundred and growing
with every method, compose their config and call ``train`` as that entry does, and check
that what it raises is an error Hydra prints as its message alone."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import hydra.utils
import pytest
import torch
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from compaware.config import CONF_DIR
from compaware.train import run_app, train
from tests.conftest import REPO
from tests.test_checkpoint import _RunsCode

CONF = Path(CONF_DIR)
pytestmark = pytest.mark.usefixtures("one_thread")

# Options of a regularizer or compressor that legitimately take any value of their type
# ("group.name"); every other numeric, text or boolean option must reject a wrong one.
UNCHECKED: set[str] = set()


def _kinds(hint) -> set:
    """The types a parameter annotation allows (``int | None`` → {int, NoneType})."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return set(typing.get_args(hint)) if union else {hint}


def discovered_rows() -> list[tuple[list[str], list[str]]]:
    """For every compaware/conf/{regularizer,compress} YAML, each constructor parameter gets a
    wrong value for its type: numbers a non-number and an absurd negative, text a
    non-choice, booleans a non-boolean (once per constructor: l1, l2 and none share one)."""
    rows, seen = [], set()
    for group in ("regularizer", "compress"):
        for yaml in sorted((CONF / group).glob("*.yaml")):
            target = hydra.utils.get_object(OmegaConf.load(yaml)._target_)
            init = target.__init__ if inspect.isclass(target) else target
            if init in seen:
                continue
            seen.add(init)
            hints = typing.get_type_hints(init)
            for name, param in inspect.signature(target).parameters.items():
                option = f"{group}.{name}"
                if option in UNCHECKED or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                    continue
                kinds, pick = _kinds(hints.get(name)), f"{group}={yaml.stem}"
                if bool in kinds:
                    bad = ["maybe"]
                elif kinds & {int, float}:
                    bad = ["abc", "-1e9", "nan"]
                elif str in kinds:
                    bad = ["no_such_choice"]
                else:
                    continue
                rows += [([pick, f"++{option}={value}"], [option]) for value in bad]
    return rows


EXPLICIT = [
    # unknown groups, options and keys
    (["optimizer=adam"], ["optimizer"]),
    (["regularizer=lowrnk"], ["regularizer/lowrnk", "lowrank"]),
    (["compress=zip"], ["compress/zip", "svd"]),
    (["model=resnet5"], ["model", "lenet5", "torchvision"]),
    (["data=nope"], ["data", "digits", "fashion_mnist"]),
    (["sead=1"], ["sead"]),
    (["+sead=1"], ["sead", "seed"]),
    (["schedule.epoch=3"], ["schedule.epoch"]),
    (["+schedule.warmup=3"], ["warmup"]),
    (["+regularizer.alpha=0.5"], ["regularizer", "alpha", "lam"]),
    (["+compress.ratio=0.5"], ["compress", "ratio", "energy"]),
    # wrong types
    (["schedule.epochs=abc"], ["schedule.epochs", "abc"]),
    (["schedule.lr=fast"], ["schedule.lr"]),
    (["seed=1.5"], ["seed"]),
    (["resume=maybe"], ["resume"]),
    (["schedule.batch_size=[1,2]"], ["schedule.batch_size"]),
    (["data.limit=ten"], ["data.limit"]),
    (["schedule.channels_last=sometimes"], ["schedule.channels_last"]),
    (["schedule.optimizer=adagrad"], ["schedule.optimizer", "sgd", "adam", "adamw"]),
    (["schedule.lr_schedule=linear"], ["schedule.lr_schedule", "cosine"]),
    (["schedule.on_nan=ignore"], ["schedule.on_nan", "skip_batch", "restore"]),
    (["schedule.amp=fp8"], ["schedule.amp", "bf16", "fp16"]),
    (["device=gpu"], ["device", "cpu", "cuda", "auto"]),
    # out of range
    (["regularizer.lam=-1"], ["regularizer.lam", ">= 0"]),
    (["compress.energy=2"], ["compress.energy", "(0, 1]"]),
    (["regularizer.every=sometimes"], ["regularizer.every", "epoch", "step"]),
    (["schedule.epochs=-1"], ["schedule.epochs", "[0, 100000]"]),
    (["schedule.pretrain_epochs=-2"], ["schedule.pretrain_epochs"]),
    (["schedule.lr=0"], ["schedule.lr", "> 0"]),
    (["schedule.strength_ramp=1.5"], ["schedule.strength_ramp", "[0, 1]"]),
    (["schedule.strength_ramp=-0.1"], ["schedule.strength_ramp", "[0, 1]"]),
    (["schedule.finetune_lr=-1"], ["schedule.finetune_lr"]),
    (["schedule.batch_size=0"], ["schedule.batch_size"]),
    (["schedule.momentum=1.5"], ["schedule.momentum", "[0, 1]"]),
    (["schedule.weight_decay=-0.1"], ["schedule.weight_decay"]),
    (["schedule.lr_gamma=0"], ["schedule.lr_gamma"]),
    (["schedule.lr_milestones=[0]"], ["schedule.lr_milestones"]),
    (["schedule.max_steps_per_epoch=0"], ["schedule.max_steps_per_epoch"]),
    (["data.limit=0"], ["data.limit"]),
    (["data.image_size=4"], ["data.image_size"]),
    (["data.num_workers=-1"], ["data.num_workers"]),
    (["data=synthetic", "data.noise=-1"], ["data.noise"]),
    (["bench.batch_size=0"], ["bench.batch_size"]),
    (["bench.min_run_time=0"], ["bench.min_run_time"]),
    (["bench.threads=0"], ["bench.threads"]),
    (["bench.forms=[eager,channel_last]"],
     ["bench.forms", "eager, channels_last, strided_pools, inductor, onnxruntime",
      "channels_last"]),
    (["bench.forms=[eager,eager]"], ["bench.forms", "twice"]),
    (["bench.fastest=true"], ["bench.fastest", "bench.forms=[eager,channels_last]"]),
    (["model=torchvision", "model.name=resnet"], ["model.name", "resnet18"]),
    # conflicting options
    (["data.channels=3"], ["data.channels", "data=digits"]),
    (["resume=true", "init_from=/tmp"], ["resume", "init_from"]),
    (["resume=true"], ["resume=true", "hydra.run.dir"]),
    # missing data roots and files
    (["data=mnist", "data.root=/nonexistent"], ["data=mnist", "/nonexistent", "data.root"]),
    (["data=fashion_mnist", "data.root=/nonexistent"], ["data=fashion_mnist", "data.root"]),
    (["data=cifar10", "data.root=/nonexistent"], ["data=cifar10", "data.root"]),
    (["data=imagenet", "data.root=/nonexistent"], ["data=imagenet", "data.root"]),
    (["init_from=/nonexistent/run"], ["init_from", "does not exist"]),
    # unwritable output directories
    (["hydra.run.dir=/proc/compaware"], ["hydra.run.dir=/proc/compaware", "cannot be written"]),
    (["-m", "hydra.sweep.dir=/proc/compaware", "seed=1,2"], ["hydra.sweep.dir"]),
    (["hydra.run.dir="], ["hydra.run.dir is empty"]),
    # not finite, or beyond what any machine runs (checked at start, not steps or hours later)
    (["regularizer.lam=nan"], ["regularizer.lam", "finite"]),
    (["schedule.lr=inf"], ["schedule.lr", "finite"]),
    (["schedule.momentum=nan"], ["schedule.momentum", "finite"]),
    (["compress.energy=nan"], ["compress.energy", "finite"]),
    (["seed=18446744073709551616"], ["seed", "[0, 4294967295]"]),
    (["schedule.epochs=1000000000000"], ["schedule.epochs", "[0, 100000]"]),
    (["data.image_size=20000"], ["data.image_size", "GiB"]),
    (["schedule.batch_size=1000000"], ["schedule.batch_size", "GiB"]),
    (["bench.latency=true", "bench.batch_size=1000000"], ["bench.batch_size", "GiB"]),
    (["bench.min_run_time=1e9"], ["bench.min_run_time", "(0, 60.0]"]),
    # pairs that could only fail after training
    (["compress=quantize", "regularizer=l2"], ["compress=quantize", "regularizer=sws"]),
    (["compress=prune", "compress.input_shape=[1,28]"], ["compress.input_shape=[1, 28]"]),
    (["-m", "schedule.epochs=1,abc"], ["schedule.epochs=abc", "none of its jobs ran"]),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished debug run, for the rows that meet an existing run directory."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert run(["debug=fast", "compress=none", "schedule.finetune_epochs=0",
                "bench.latency=false", f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def run(argv: list[str], env: dict[str, str] | None = None) -> int:
    """``compaware train <argv>`` in this process; returns the exit status."""
    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["compaware train", *argv]
    os.environ.update(env or {})
    try:
        run_app()
        status = 0
    except SystemExit as e:  # Hydra's error exit, or a callback's exit with a message
        status = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            sys.stderr.write(e.code)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return status


def _special_rows(finished: Path, tmp: Path) -> list[tuple[list[str], list[str], dict]]:
    """Rows that need files or an environment: a run directory in use, untrusted files."""
    evil = tmp / "evil.pt"
    torch.save({"model": _RunsCode()}, evil)
    truncated = tmp / "truncated"
    (truncated / "checkpoints").mkdir(parents=True)
    (truncated / "checkpoints" / "train.pt").write_bytes(
        (finished / "checkpoints" / "train.pt").read_bytes()[:1000])
    a_file = tmp / "a_file"
    a_file.write_text("not a directory")
    return [
        ([f"hydra.run.dir={finished}"], ["already holds a run", "resume=true"], {}),
        ([f"hydra.run.dir={finished}", "resume=true", "model=lenet300"],
         ["differs", "model"], {}),
        ([f"hydra.run.dir={truncated}", "resume=true"], ["truncated, corrupted"], {}),
        ([f"init_from={evil}"], ["init_from", "weights_only"], {}),
        ([f"init_from={a_file}"], ["init_from", "cannot be loaded"], {}),
        ([f"hydra.run.dir={a_file}/run"], ["hydra.run.dir", "cannot be written"], {}),
        (["schedule.batch_size=31"], ["schedule.batch_size=31", "2 processes"],
         {"WORLD_SIZE": "2"}),
        *([] if torch.cuda.is_available() else [(["device=cuda"], ["device=cuda"], {})]),
    ]


def test_every_bad_command_line_stops_at_start_naming_the_option(finished_run, tmp_path, capfd):
    rows = [(argv, expected, {}) for argv, expected in EXPLICIT]
    rows += _special_rows(finished_run, tmp_path)
    assert len(rows) >= 30
    failures, seconds = [], []
    for i, (argv, expected, env) in enumerate(rows):
        run_dir = tmp_path / f"row{i}"
        own_dir = any(a.startswith(("hydra.run.dir", "hydra.sweep.dir")) for a in argv)
        start = time.perf_counter()
        status = run(["debug=fast", "bench.latency=false", *argv,
                         *([] if own_dir else [f"hydra.run.dir={run_dir}"])], env)
        seconds.append(time.perf_counter() - start)
        out, err = capfd.readouterr()
        problems = [f"exit status {status}"] if status == 0 else []
        problems += [f"no {text!r}" for text in expected if text not in err]
        problems += ["a traceback"] if "Traceback" in out + err else []
        problems += ["training started"] if (run_dir / "checkpoints").exists() else []
        if problems:
            failures.append(f"{' '.join(argv)}: {', '.join(problems)}\n    {err.strip()[-400:]}")
    slowest = max(range(len(rows)), key=seconds.__getitem__)
    with capfd.disabled():
        print(f"\n{len(rows)} bad command lines, {len(rows) - len(failures)} stopped at start "
              f"with a message naming the option; median {sorted(seconds)[len(seconds) // 2]:.2f}"
              f" s, slowest {seconds[slowest]:.1f} s ({' '.join(rows[slowest][0])})")
    assert not failures, "\n".join(failures)


def test_every_option_of_every_method_rejects_a_bad_value(make_cfg, tmp_path):
    rows, failures = discovered_rows(), []
    for argv, expected in rows:
        try:
            train(make_cfg(*argv, "bench.latency=false"))
            failures.append(f"{' '.join(argv)}: accepted")
        except CompactHydraException as e:  # what Hydra prints as its message alone
            if not all(text in str(e) for text in expected):
                failures.append(f"{' '.join(argv)}: {e}")
        assert not (tmp_path / "run" / "checkpoints").exists(), argv  # stopped at start
    print(f"\n{len(rows)} bad values of the {len({tuple(r[0][:1]) for r in rows})} methods' "
          f"options (from compaware/conf/), {len(rows) - len(failures)} refused naming the option")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("argv", "expected"), [
    (["hydra.run.dir=/proc/compaware"], ["hydra.run.dir", "cannot be written"]),  # Hydra's
    (["+compress.ratio=0.5"], ["compress", "ratio", "energy"]),  # compaware's
])
def test_as_a_real_subprocess(tmp_path, argv, expected):
    """The same checks through a fresh `compaware train` process, as a user meets them."""
    exe = Path(sys.executable).with_name("compaware")
    run_dir = [] if argv[0].startswith("hydra.run.dir") else [f"hydra.run.dir={tmp_path}"]
    out = subprocess.run([str(exe), "train", *argv, *run_dir], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode != 0
    assert "Traceback" not in out.stdout + out.stderr
    for text in expected:
        assert text in out.stderr, (text, out.stderr)
