"""Preemption: a signal asks the run to stop at the next step boundary, with a checkpoint.

Clusters announce the end of a job with a signal: SLURM sends SIGTERM on preemption
or cancellation and SIGUSR1/SIGUSR2 ahead of the time limit (``sbatch --signal``;
submitit uses USR2), torchrun forwards SIGTERM to its workers. Inside
:func:`stop_at_next_step` these signals only raise a flag. The training loop looks at
it between two steps, where model, optimizer and data order agree, writes a step
checkpoint and raises :class:`Preempted`; the app records the run as ``preempted``
and exits cleanly. A rerun in the same run directory (a requeued job) resumes at
that step by itself. A handler that was installed before ours, like submitit's,
which requeues the job, is called once the checkpoint is written
(:meth:`Preempted.pass_on`).

Compression and the benchmark have no steps and checkpoint nothing: a rerun repeats them
from the last checkpoint. Inside :func:`stop_at_once` (around those stages) a signal raises
:class:`Preempted` at once, wherever the main thread is, a library's loop included
(Torch-Pruning's dependency search may run for many minutes without returning to us).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_received: list[int] = []
_previous: dict[int, object] = {}
_at_once: list[bool] = []  # non-empty inside stop_at_once


class Preempted(Exception):
    """Raised at a step boundary after a preemption signal, once the checkpoint is written."""

    def __init__(self, signum: int | None, where: str, checkpoint: Path | None) -> None:
        by = signal.Signals(signum).name if signum else "a signal to another rank"
        kept = (f"checkpoint {checkpoint} written" if checkpoint else
                f"stopped at once, nothing written (a rerun repeats the {where})")
        super().__init__(f"{where}: preempted by {by}; {kept}. The same command in the same "
                         f"run directory continues the run.")
        self.signum = signum

    def pass_on(self) -> None:
        """Call the handler the signal had before ours (submitit's requeues the job)."""
        previous = _previous.get(self.signum)
        if callable(previous):
            previous(self.signum, None)


@contextmanager
def stop_at_next_step() -> Iterator[None]:
    """While inside, :data:`SIGNALS` set the flag that :func:`requested` reads."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python delivers signals to the main thread only
        return
    _received.clear()
    _previous.update({sig: signal.signal(sig, _remember) for sig in SIGNALS})
    try:
        yield
    finally:
        for sig in SIGNALS:  # None: a handler not set from Python, i.e. the default
            signal.signal(sig, _previous[sig] if _previous[sig] is not None else signal.SIG_DFL)


@contextmanager
def stop_at_once(where: str) -> Iterator[None]:
    """While inside, a preemption signal raises :class:`Preempted` at once (one received
    before, on entry): for a stage ``where`` with no step boundary, which a rerun repeats
    from the checkpoints the run has."""
    if requested() is not None:
        raise Preempted(requested(), where, None)
    _at_once.append(True)
    try:
        yield
    except _Interrupted as signal_received:
        raise Preempted(signal_received.signum, where, None) from None
    finally:
        _at_once.pop()


def requested() -> int | None:
    """The first preemption signal received, if any."""
    return _received[0] if _received else None


def _remember(signum: int, frame: object) -> None:
    _received.append(signum)
    if _at_once:  # signal handlers run in the main thread, between two Python instructions
        raise _Interrupted(signum)


class _Interrupted(BaseException):
    """What the handler raises inside :func:`stop_at_once`: not an :class:`Exception`, so that
    a library's ``except Exception`` (a tracer trying another way) does not swallow it; the
    context turns it into :class:`Preempted`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
