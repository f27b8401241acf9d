"""Hand-written C kernels, off unless a run asks for them (``native_kernels=true``): built on
first use with the machine's C compiler and loaded with ctypes.

The methods compute everything with torch's operators; where this switch is on, two of their
loops run here instead, with the same results: soft weight-sharing's mixture prior
(``mixture.c``, :mod:`compaware.native.mixture`), for which torch's operators, compiled or
not, leave most of a CPU unused, and SSL's group sums (``group_sums.c``,
:mod:`compaware.native.group_sums`), which torch's read from memory more often than the
maths needs. Off by default because a build depends on the machine (a C compiler, its
OpenMP, ``-march=native``, ``-ffast-math``) and a library is one more thing to trust; while
off, nothing here invokes a compiler (:func:`load` refuses). ``scripts/bench_overhead.py``
measures what the switch buys.

A kernel is a plain C function over raw float arrays: no torch headers, so it builds in
about a second. The library is cached under ``$XDG_CACHE_HOME/compaware``
(``~/.cache/compaware``), keyed by the source, the flags and this CPU (it is built with
``-march=native``), and written atomically, so concurrent processes share one build. Any
failure (no compiler, a build error, an unwritable cache) raises :class:`NativeUnavailable`
with the reason; callers fall back to their torch code.

A kernel shares its work among threads with OpenMP pragmas. Built with ``-fopenmp``, the
library needs ``libgomp.so.1``, and the dynamic loader hands it the one torch has already
loaded (same name): the kernel runs on torch's own thread team, as many threads as
``torch.set_num_threads`` says, with no second pool competing for the cores (Python threads
around the calls made ``sws``'s prior 1.1–1.5× slower at 2 threads: torch's OpenMP threads
still spin for a while after each of its operators). A compiler without OpenMP builds the
kernel without it: one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

# -ffast-math lets the compiler vectorise expf through glibc's vector math library. It is
# given when compiling only: linked with it, gcc would add crtfastmath.o, which sets
# flush-to-zero for the whole process when the library loads. On x86, gcc's -march=native
# still prefers 256-bit vectors on AVX-512 CPUs; 512-bit ones made the mixture kernel 1.4×
# faster here (its vector expf too), and change nothing on CPUs without AVX-512.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC",
                 *(["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64")
                   else [])]
LINK_FLAGS = ["-shared", "-lm"]
OPENMP_FLAGS = ["-fopenmp"]

log = logging.getLogger(__name__)


_enabled = False  # native_kernels: the run's choice, applied by use()


class NativeUnavailable(RuntimeError):
    """The kernel could not be built or loaded here (the message says why)."""


def use(enabled: bool) -> None:
    """Switch the C kernels on or off for this process (``native_kernels``): the methods
    call into this package only while it is on."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"native.use takes a bool, not {enabled!r}")
    _enabled = enabled


def enabled() -> bool:
    """Whether the C kernels are on (:func:`use`)."""
    return _enabled


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines()
             if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(lines))  # each distinct line once


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compaware"


def load(source: Path) -> ctypes.CDLL:
    """The shared library built from C file ``source``, compiled if not cached yet: with
    OpenMP, else (a compiler without it) without. Refused while the kernels are off."""
    if not _enabled:
        raise NativeUnavailable("native kernels are off (native_kernels=false)")
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C compiler ({compiler!r} is not on PATH; set CC)")
    try:
        return _load(compiler, source, OPENMP_FLAGS)
    except NativeUnavailable:
        return _load(compiler, source, [])


def load_or_warn(source: Path, fallback: str,
                 signatures: dict[str, list]) -> ctypes.CDLL | None:
    """:func:`load`, its functions declared with the ctypes argument types of
    ``signatures`` (name → argtypes; they return nothing), or None with a warning that says
    why and what runs instead (``fallback``, a sentence): a kernel only makes its caller
    faster, never different."""
    try:
        library = load(source)
    except NativeUnavailable as e:
        log.warning("The C kernel %s is unavailable here (%s); %s", source.name, e, fallback)
        return None
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


def _load(compiler: str, source: Path, extra_flags: list[str]) -> ctypes.CDLL:
    compile_flags, link_flags = COMPILE_FLAGS + extra_flags, LINK_FLAGS + extra_flags
    key = hashlib.sha256("\n".join([source.read_text(), compiler, *compile_flags, *link_flags,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    library = _cache_dir() / f"{source.stem}-{key}.so"
    if not library.exists():
        _build(compiler, source, library, compile_flags, link_flags)
    try:
        return ctypes.CDLL(str(library))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {library}: {e}") from None


def _build(compiler: str, source: Path, library: Path, compile_flags: list[str],
           link_flags: list[str]) -> None:
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            obj, built = Path(tmp) / "kernel.o", Path(tmp) / library.name
            for command in ([compiler, *compile_flags, "-c", str(source), "-o", str(obj)],
                            [compiler, str(obj), "-o", str(built), *link_flags]):
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    lines = result.stderr.strip().splitlines()
                    errors = [line for line in lines if "error" in line] or lines
                    raise NativeUnavailable(f"{compiler} failed on {source.name}: "
                                            f"{' / '.join(errors[:3])[:500]}")
            os.replace(built, library)  # atomic: a concurrent build writes the same bytes
    except OSError as e:
        raise NativeUnavailable(f"cannot build in {library.parent}: {e}") from None


def addresses(tensors: Iterable[Tensor]) -> Tensor:
    """The tensors' data pointers in an int64 array: a kernel's argument that lists arrays."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
