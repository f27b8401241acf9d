"""Shared fixtures: compose the real config tree (as `compaware train` would) into tmp dirs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from compaware.config import CONF_DIR

REPO = Path(__file__).resolve().parent.parent  # the checkout (CONF_DIR is inside the package)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, fast=True)``: the composed config, writing under ``tmp_path``."""

    def make(*overrides: str, fast: bool = True, run_dir: Path | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=[
                *(["debug=fast"] if fast else []),
                f"paths.run_dir={run_dir or tmp_path / 'run'}",
                *overrides])

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: runs compared bit for bit with subprocesses must use
    the same count as they do, and on a machine shared by many processes, OpenMP threads
    that wait for each other make an SVD take seconds instead of a tenth of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_threads() -> Callable[[int], None]:
    """``torch.set_num_threads`` for one test, the count restored after it."""
    threads = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(threads)


def run_cli(*args: str, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the console script (`compaware ...`) as a user would."""
    exe = Path(sys.executable).with_name("compaware")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=timeout)


def assert_reloads_without_compaware(model, example, tmp_path: Path) -> None:
    """``model`` exported to a standalone file gives the same outputs on ``example`` in a
    fresh Python that never imports compaware."""
    from compaware.deploy.export import export_model

    model.eval()
    export_model(model, example[:2], tmp_path / "m.pt2")
    torch.save({"x": example, "y": model(example).detach()}, tmp_path / "io.pt")
    script = ("import sys, torch\n"
              "m = torch.export.load(sys.argv[1]).module()\n"
              "io = torch.load(sys.argv[2], weights_only=True)\n"
              "assert 'compaware' not in sys.modules\n"
              "torch.testing.assert_close(m(io['x']), io['y'], atol=1e-5, rtol=1e-5)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pt2"),
                          str(tmp_path / "io.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
