"""Hand-written C kernels: never built unless switched on, built once into the cache, clear
errors when they cannot be, no side effect on the process's floating point, and their work
shared among torch's threads."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from compaware import native
from compaware.data import DataInfo
from compaware.native import group_sums, mixture
from compaware.regularizers import SSL, SoftWeightSharing
from compaware.train import train

MIXTURE_SOURCE = mixture.SOURCE
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "compaware"


@pytest.fixture
def native_kernels():
    """native_kernels=true for one test."""
    native.use(True)
    yield
    native.use(False)


def test_off_by_default_nothing_is_ever_built(cache, monkeypatch, caplog):
    """With native_kernels=false (the default) the methods run on torch alone: a missing
    compiler is never looked for, nothing is built or loaded, nothing is said."""
    def no_building(*args, **kwargs):
        raise AssertionError("a C kernel was built or loaded")

    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setattr(native, "_load", no_building)
    for kernel in (mixture._kernel, group_sums._kernel):
        kernel.cache_clear()  # an earlier test's build does not count
    assert not native.enabled()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(36, 2))
    caplog.set_level(logging.DEBUG, logger="compaware")
    prior = SoftWeightSharing(components=4, kernel="eager")
    prior.setup(model, DataInfo("synthetic", 2, 5, 2, train_size=100))
    prior.penalty(model).backward()
    ssl = SSL(filter=0.1, channel=0.1, shape=0.1)
    ssl.penalty(model)
    ssl.after_backward(model)
    assert not cache.exists()
    assert not [r for r in caplog.records if r.name.startswith("compaware")]
    with pytest.raises(native.NativeUnavailable, match="off.*native_kernels=false"):
        native.load(MIXTURE_SOURCE)


def test_the_switch_takes_a_boolean_only():
    with pytest.raises(TypeError, match="bool"):
        native.use("false")
    assert not native.enabled()


def test_the_switch_is_a_run_option_off_by_default(make_cfg):
    assert make_cfg().native_kernels is False
    assert make_cfg("native_kernels=true").native_kernels is True
    with pytest.raises(Exception, match="native_kernels"):
        make_cfg("native_kernels=sometimes")


def test_a_run_applies_the_switch_before_building_anything(make_cfg, monkeypatch):
    seen = []
    monkeypatch.setattr(native, "use", seen.append)
    train(make_cfg("native_kernels=true", "schedule.finetune_epochs=0", "bench.latency=false"))
    assert seen == [True]


@needs_cc
def test_a_kernel_is_built_once_and_then_loaded_from_the_cache(native_kernels, cache,
                                                               monkeypatch):
    assert native.load(MIXTURE_SOURCE).mixture_sums_pieces
    (library,) = cache.glob("mixture-*.so")
    built_at = library.stat().st_mtime_ns

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert native.load(MIXTURE_SOURCE).mixture_sums_pieces
    assert library.stat().st_mtime_ns == built_at
    assert list(cache.iterdir()) == [library]  # no temporary left behind


@needs_cc
def test_loading_a_kernel_keeps_subnormal_numbers(native_kernels, cache):
    """Linked with -ffast-math, gcc would make the library switch on flush-to-zero for the
    whole process when it loads, silently changing every other computation."""
    native.load(MIXTURE_SOURCE)
    tiny = 1e-308
    assert tiny * 1e-5 > 0.0


@needs_cc
def test_a_source_that_does_not_compile_says_why(native_kernels, cache, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return undeclared; }\n")
    with pytest.raises(native.NativeUnavailable, match="cc failed on broken.c: .*undeclared"):
        native.load(broken)
    assert not list(cache.glob("broken-*"))


@needs_cc
def test_no_compiler_is_named(native_kernels, cache, monkeypatch):
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


@needs_cc
def test_a_kernel_runs_on_torch_s_threads(native_kernels, cache, tmp_path, torch_threads):
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


@needs_cc
def test_a_compiler_without_openmp_builds_for_one_thread(native_kernels, cache, tmp_path,
                                                        torch_threads, monkeypatch):
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\ncase "$*" in *-fopenmp*) echo "error: no OpenMP" >&2; '
                        'exit 1;; esac\nexec cc "$@"\n')
    compiler.chmod(0o755)
    source = tmp_path / "count.c"
    source.write_text(COUNT_THREADS)
    torch_threads(2)
    monkeypatch.setenv("CC", str(compiler))
    assert native.load(source).threads() == 1
