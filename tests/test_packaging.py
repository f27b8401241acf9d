"""The built wheel is a tool that starts: it ships the config tree and the C sources, and its
console script trains from a directory outside the checkout, reading only installed files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import REPO

# What the build reads, copied away from the checkout: a stale build/ there would go into the
# wheel too (setuptools reuses it), hiding a file the package no longer ships.
BUILD_INPUTS = ("pyproject.toml", "README.md", "compaware")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, f"{command}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_installs_and_trains_outside_the_checkout(tmp_path: Path):
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(source)])
    (wheel,) = (tmp_path / "wheel").glob("compaware-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "compaware").rglob("*")
               if p.suffix in (".yaml", ".c")}
    assert {"compaware/conf/config.yaml", "compaware/native/mixture.c"} <= shipped
    assert sorted(shipped - names) == []

    # A fresh environment holding only compaware; its dependencies come from this Python's
    # site-packages through PYTHONPATH, after the new one's (a path there processes no .pth
    # file, so an editable compaware installed in this environment stays out of sight).
    # No inherited PYTHONPATH while installing: pip would take a checkout on it (with its
    # egg-info) for compaware already installed.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=clean)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)], env=clean)
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               env=clean).stdout.strip()
    env = {**clean, "PYTHONPATH": f"{site}{os.pathsep}{sysconfig.get_paths()['purelib']}",
           "OMP_NUM_THREADS": "1"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import compaware.config as c; print(c.__file__)"],
                cwd=elsewhere, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    run([str(venv / "bin" / "compaware"), "train", "debug=fast",
         f"hydra.run.dir={tmp_path / 'run'}"], cwd=elsewhere, env=env)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
