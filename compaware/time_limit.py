"""A wall-clock limit on a stage whose work may never come back to compaware's code.

Compression runs inside libraries (Torch-Pruning's dependency search, an SVD, a tracer)
that check no flag of ours, so the limit is an interval timer: when it fires, SIGALRM's
handler raises in the main thread at the next Python instruction, wherever that is (not an
:class:`Exception`, which a library's ``except Exception`` would swallow: the tracers retry
other ways), the context turns that into :class:`TimeLimitExceeded`, and the app records the
run as ``failed`` with its message.
A single call into C (one huge matrix product) finishes first. Python delivers signals to
the main thread only, so elsewhere (a thread of a test runner), and on platforms without
``setitimer``, the stage runs without a limit.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from compaware.config import UserError


class TimeLimitExceeded(UserError):
    """A stage ran past its time limit (a :class:`UserError`: the message is the report)."""


@contextmanager
def time_limit(seconds: float | None, stage: str, option: str, advice: str) -> Iterator[None]:
    """Run the body for at most ``seconds`` (None: no limit); past it, stop it with a
    :class:`TimeLimitExceeded` naming ``stage``, the code it was in, ``option`` and
    ``advice`` (what to change)."""
    if (seconds is None or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    start = time.monotonic()

    def expire(signum: int, frame: FrameType | None) -> None:
        raise _Expired(where(frame))

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired as expired:
        raise TimeLimitExceeded(
            f"{stage} ran past {option}={seconds:g} s ({time.monotonic() - start:.0f} s, in "
            f"{expired.where}) and was stopped; the run is recorded as failed. {advice} "
            f"{option} takes a number of seconds > 0, or null for no limit.") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def where(frame: FrameType | None) -> str:
    """``module.function`` of the innermost frame in a module's file (not generated code, a
    named tuple's, say), and of compaware's frame that called into it: which library held the
    stage, and from where."""
    spots: list[str] = []
    while frame is not None:
        module = sys.modules.get(frame.f_globals.get("__name__", ""))
        ours = getattr(module, "__name__", "").startswith("compaware.")
        if getattr(module, "__file__", None) and (not spots or ours):
            spots.append(f"{module.__name__}.{frame.f_code.co_name}")
            if ours:
                break
        frame = frame.f_back
    if not spots:
        return "code outside Python"
    return ", called from ".join(spots)


class _Expired(BaseException):
    """What the timer's handler raises (see the module's docstring)."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where
