"""Hand-written C kernels, built on first use with the machine's C compiler and loaded with
ctypes.

For the rare loop where torch's operators, compiled or not, leave most of a CPU unused
(soft weight-sharing's mixture prior: ``compaware/regularizers/mixture.c``) or read memory
more often than the maths needs (SSL's group sums:
``compaware/regularizers/group_sums.c``). A kernel is a plain C function over raw float
arrays: no torch headers, so it builds in about a second. The library is cached under
``$XDG_CACHE_HOME/compaware`` (``~/.cache/compaware``), keyed by the source, the flags and
this CPU (it is built with ``-march=native``), and written atomically, so concurrent
processes share one build. Any failure (no compiler, a build error, an unwritable cache)
raises :class:`NativeUnavailable` with the reason; callers fall back to their torch code.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

# -ffast-math lets the compiler vectorise expf through glibc's vector math library. It is
# given when compiling only: linked with it, gcc would add crtfastmath.o, which sets
# flush-to-zero for the whole process when the library loads. On x86, gcc's -march=native
# still prefers 256-bit vectors on AVX-512 CPUs; 512-bit ones made the mixture kernel 1.4×
# faster here (its vector expf too), and change nothing on CPUs without AVX-512.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC",
                 *(["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64")
                   else [])]
LINK_FLAGS = ["-shared", "-lm"]


class NativeUnavailable(RuntimeError):
    """The kernel could not be built or loaded here (the message says why)."""


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
    """The shared library built from C file ``source``, compiled if not cached yet."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C compiler ({compiler!r} is not on PATH; set CC)")
    key = hashlib.sha256("\n".join([source.read_text(), compiler, *COMPILE_FLAGS, *LINK_FLAGS,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    library = _cache_dir() / f"{source.stem}-{key}.so"
    if not library.exists():
        _build(compiler, source, library)
    try:
        return ctypes.CDLL(str(library))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {library}: {e}") from None


def _build(compiler: str, source: Path, library: Path) -> None:
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            obj, built = Path(tmp) / "kernel.o", Path(tmp) / library.name
            for command in ([compiler, *COMPILE_FLAGS, "-c", str(source), "-o", str(obj)],
                            [compiler, str(obj), "-o", str(built), *LINK_FLAGS]):
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    lines = result.stderr.strip().splitlines()
                    errors = [line for line in lines if "error" in line] or lines
                    raise NativeUnavailable(f"{compiler} failed on {source.name}: "
                                            f"{' / '.join(errors[:3])[:500]}")
            os.replace(built, library)  # atomic: a concurrent build writes the same bytes
    except OSError as e:
        raise NativeUnavailable(f"cannot build in {library.parent}: {e}") from None
