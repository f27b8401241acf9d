"""Hand-written C kernels: built once into the cache, clear errors when they cannot be, no
side effect on the process's floating point, and their work shared among torch's threads."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from compaware import native
from compaware.regularizers.sws import MIXTURE_SOURCE

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "compaware"


def test_a_kernel_is_built_once_and_then_loaded_from_the_cache(cache, monkeypatch):
    assert native.load(MIXTURE_SOURCE).mixture_sums_pieces
    (library,) = cache.glob("mixture-*.so")
    built_at = library.stat().st_mtime_ns

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert native.load(MIXTURE_SOURCE).mixture_sums_pieces
    assert library.stat().st_mtime_ns == built_at
    assert list(cache.iterdir()) == [library]  # no temporary left behind


def test_loading_a_kernel_keeps_subnormal_numbers(cache):
    """Linked with -ffast-math, gcc would make the library switch on flush-to-zero for the
    whole process when it loads, silently changing every other computation."""
    native.load(MIXTURE_SOURCE)
    tiny = 1e-308
    assert tiny * 1e-5 > 0.0


def test_a_source_that_does_not_compile_says_why(cache, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return undeclared; }\n")
    with pytest.raises(native.NativeUnavailable, match="cc failed on broken.c: .*undeclared"):
        native.load(broken)
    assert not list(cache.glob("broken-*"))


def test_no_compiler_is_named(cache, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(native.NativeUnavailable, match="no C compiler.*no-such-cc.*set CC"):
        native.load(MIXTURE_SOURCE)


COUNT_THREADS = """
int threads(void) {
    int n = 0;
    #pragma omp parallel
    {
        #pragma omp atomic
        n++;
    }
    return n;
}
"""


def openmp_runtimes() -> set[str]:
    """The OpenMP libraries this process has loaded (Linux; empty elsewhere)."""
    maps = Path("/proc/self/maps")
    text = maps.read_text() if maps.exists() else ""
    return set(re.findall(r"\S*/lib(?:gomp|iomp5|omp)\b[\w.-]*\.so[\w.]*", text))


def test_a_kernel_runs_on_torch_s_threads(cache, tmp_path, torch_threads):
    """Its OpenMP regions take torch.set_num_threads' count (3, not this 2-core machine's
    default), and loading it adds no OpenMP runtime to torch's: no second team of threads
    competing for the cores."""
    source = tmp_path / "count.c"
    source.write_text(COUNT_THREADS)
    runtimes = openmp_runtimes()
    threads = native.load(source).threads
    assert openmp_runtimes() == runtimes
    for n in (3, 1):
        torch_threads(n)
        assert threads() == n


def test_a_compiler_without_openmp_builds_for_one_thread(cache, tmp_path, torch_threads,
                                                        monkeypatch):
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\ncase "$*" in *-fopenmp*) echo "error: no OpenMP" >&2; '
                        'exit 1;; esac\nexec cc "$@"\n')
    compiler.chmod(0o755)
    source = tmp_path / "count.c"
    source.write_text(COUNT_THREADS)
    torch_threads(2)
    monkeypatch.setenv("CC", str(compiler))
    assert native.load(source).threads() == 1
