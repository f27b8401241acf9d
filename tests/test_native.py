"""Hand-written C kernels: built once into the cache, clear errors when they cannot be, and no
side effect on the process's floating point."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from compaware import native
from compaware.regularizers.sws import MIXTURE_SOURCE

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "compaware"


def test_a_kernel_is_built_once_and_then_loaded_from_the_cache(cache, monkeypatch):
    assert native.load(MIXTURE_SOURCE).mixture_sums
    (library,) = cache.glob("mixture-*.so")
    built_at = library.stat().st_mtime_ns

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert native.load(MIXTURE_SOURCE).mixture_sums
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
