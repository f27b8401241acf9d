"""Hydra callbacks: checks that must happen before Hydra itself writes anything."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class CheckOutputDir(Callback):
    """Stop with a message naming the option when the output directory cannot be written
    (Hydra's own attempt to create it would end in a traceback).

    Hydra turns a callback's exceptions into warnings and goes on; ``SystemExit`` is how a
    callback stops the run (Python prints its message to stderr and exits with status 1).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


def _check_writable(value: Any, option: str) -> None:
    if value is None or not str(value).strip():  # Path("") is the current directory
        raise SystemExit(f"{option} is empty, which would write the run into the current "
                         f"directory. {option} takes the path of a directory for the run "
                         f"(leave it out for a new dated one under outputs/).")
    path = Path(str(value))
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SystemExit(f"{option}={path} cannot be written: {e.strerror or e}. Choose a "
                         f"directory you can write to ({option}=...).") from None
