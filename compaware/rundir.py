"""The run directory: one run per directory, and a record of how each run ended.

A run claims its directory with a lock that the kernel releases when the process ends,
however it ends (even SIGKILL), so two processes can never write into one directory
(two runs started in the same microsecond, a resume while the run still goes on).
``results.json`` records how the run ended: ``completed`` (written by the run),
``failed`` (with the error, so a sweep keeps a trace of its failed jobs) or
``preempted`` (a rerun in the same directory then resumes by itself, which is what a
requeued SLURM job does). A start that failed before its first checkpoint holds nothing to
continue: its directory is free for the corrected command.

Hydra would write its record of the config (``.hydra/``) and open the log file before the
run can check that the directory is its own; compaware/conf/config.yaml turns both off and
:func:`open_record` writes them once it is.
"""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from compaware import checkpoint, distributed
from compaware.config import UserError, to_container

log = logging.getLogger(__name__)

_held: dict[Path, int] = {}  # the directories this process has claimed, with their lock file
_log_file: logging.Handler | None = None  # the run's train.log, while it runs
_held_back: logging.handlers.MemoryHandler | None = None  # what was logged before it opened
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's


class RunDirInUse(UserError):
    """The directory belongs to another run: nothing may be written into it."""


def claim(run_dir: Path) -> None:
    """Make ``run_dir`` this process's own for as long as it lives (``<run_dir>/.lock``)."""
    run_dir = run_dir.resolve()
    if run_dir in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write into the run directory {run_dir}: {e.strerror or e}. "
                        f"Choose a writable directory with hydra.run.dir (or "
                        f"hydra.sweep.dir for -m).") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirInUse(f"{run_dir} is in use by another compaware process: two runs never "
                          f"share a directory. Choose another hydra.run.dir, or wait for that "
                          f"run to end.") from None
    except OSError as e:  # a file system without locks (some NFS setups): carry on unguarded
        log.warning("cannot lock %s (%s): a second run in this directory would go unnoticed",
                    run_dir, e.strerror or e)
    _held[run_dir] = fd


def check(run_dir: Path, resume: bool, identity: dict) -> bool:
    """Claim ``run_dir`` (rank 0) and refuse to overwrite another run or to resume a different
    one. Returns whether to resume: ``resume=true``, or a run that was preempted."""
    if distributed.is_main():
        claim(run_dir)
    saved = sorted((run_dir / "checkpoints").glob("*.pt"))
    if not resume and saved and status(run_dir) == "preempted":
        log.info("%s was preempted: resuming it from its checkpoint", run_dir)
        resume = True
    if not resume:
        if holds_a_run(run_dir):
            raise RunDirInUse(f"{run_dir} already holds a run. Pass resume=true to continue it, "
                              f"or choose a new directory (hydra.run.dir).")
        if status(run_dir) == "failed":
            log.info("%s: the start there failed before its first checkpoint; starting afresh",
                     run_dir)
        return False
    if not saved:
        raise UserError(f"resume=true but {run_dir} has no checkpoint (checkpoints/*.pt): "
                        f"a run there stopped before its first one, so there is nothing to "
                        f"continue. Run the same command without resume=true (the directory "
                        f"can be reused), or set hydra.run.dir to the interrupted run's.")
    now, before = _flatten(identity), _flatten(checkpoint.load(saved[0]).get("identity", {}))
    changed = [k for k in now.keys() | before.keys() if now.get(k) != before.get(k)]
    if changed:
        raise RunDirInUse(f"resume=true but the config differs from the interrupted run in "
                          f"{', '.join(sorted(changed))}: resuming would mix two experiments. "
                          f"Use the original values or start a new run.")
    return True


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds something a new run would overwrite: a checkpoint, or the
    record of a run that got past its start (a start that failed with no checkpoint does
    not count: it left nothing to keep)."""
    if any((run_dir / "checkpoints").glob("*.pt")):
        return True
    return (run_dir / "results.json").exists() and status(run_dir) != "failed"


def hold_back_log() -> None:
    """Keep what is logged from now on in memory, for the log file :func:`open_record` opens
    once the directory is this run's (a refused start drops it)."""
    global _held_back
    close_log()
    _held_back = logging.handlers.MemoryHandler(capacity=1 << 16,
                                                flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(_held_back)


def open_record(run_dir: Path, cfg: DictConfig) -> None:
    """Once ``run_dir`` is this run's: Hydra's record of the run (``.hydra/config.yaml``,
    ``hydra.yaml``, ``overrides.yaml``, written atomically) and the log file
    ``<job name>.log`` (appended to by a resumed run), which starts with what was held back.
    Nothing outside Hydra's app, and nothing on the ranks > 0 of a distributed run (rank 0
    writes the run's files)."""
    global _log_file
    if not HydraConfig.initialized() or not distributed.is_main():
        close_log()
        return
    hydra_cfg = HydraConfig.instance().cfg
    record = {"config.yaml": cfg, "hydra.yaml": hydra_cfg,
              "overrides.yaml": hydra_cfg.hydra.overrides.task}
    for name, node in record.items():
        checkpoint.write_atomically(run_dir / ".hydra" / name,
                                    lambda f, node=node: f.write(OmegaConf.to_yaml(node)), "w")
    _log_file = logging.FileHandler(run_dir / f"{hydra_cfg.hydra.job.name}.log")
    _log_file.setFormatter(logging.Formatter(LOG_FORMAT))
    if _held_back is not None:
        _held_back.setTarget(_log_file)
        _held_back.flush()
    _drop_held_back()
    logging.getLogger().addHandler(_log_file)


def log_to_file(text: str) -> None:
    """``text`` in the run's log file only (the console has it already)."""
    if _log_file is not None:
        _log_file.handle(logging.makeLogRecord(
            {"name": __name__, "levelno": logging.INFO, "levelname": "INFO", "msg": text}))


def close_log() -> None:
    """Stop writing the current run's log file (the next run in this process has its own)
    and drop whatever is still held back."""
    global _log_file
    _drop_held_back()
    if _log_file is not None:
        logging.getLogger().removeHandler(_log_file)
        _log_file.close()
        _log_file = None


def _drop_held_back() -> None:
    global _held_back
    if _held_back is not None:
        logging.getLogger().removeHandler(_held_back)
        _held_back.buffer.clear()
        _held_back = None


def status(run_dir: Path) -> str | None:
    """The ``status`` in ``<run_dir>/results.json``, or None when there is none."""
    path = run_dir / "results.json"
    try:
        return json.loads(path.read_text()).get("status") if path.exists() else None
    except (OSError, ValueError, AttributeError):
        return None


def record_failure(run_dir: Path, cfg: DictConfig, error: BaseException) -> None:
    """``results.json`` with status ``failed`` and the error, so that a sweep keeps a trace
    of a failed job; nothing when the directory belongs to another run."""
    if isinstance(error, RunDirInUse):
        return
    _record(run_dir, cfg, "failed", str(error))
    if not any((run_dir / "checkpoints").glob("*.pt")):
        log.error("%s holds no checkpoint of this run: the corrected command can use the same "
                  "directory.", run_dir)


def record_preemption(run_dir: Path, cfg: DictConfig, message: str) -> None:
    """``results.json`` with status ``preempted``: a rerun in ``run_dir`` resumes by itself."""
    _record(run_dir, cfg, "preempted", message)


def _record(run_dir: Path, cfg: DictConfig, ending: str, message: str) -> None:
    if not distributed.is_main() or status(run_dir) == "completed":
        return
    if run_dir.resolve() not in _held and holds_a_run(run_dir):
        return  # stopped before claiming a directory that holds another run: leave it alone
    try:
        config = to_container(cfg)
    except Exception:  # a config that does not even resolve: the message says why
        config = {}
    try:
        checkpoint.save_json({"status": ending, "error": message, "config": config},
                             run_dir / "results.json")
    except UserError as e:  # an unwritable directory: the original error matters more
        log.warning("could not record how the run ended: %s", e)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
