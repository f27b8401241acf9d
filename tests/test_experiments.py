"""Every experiment config composes, builds, names its command and runs end to end.

Configs are discovered from compaware/conf/experiment, so a new file is covered without editing this
test. The smoke runs use ``debug=fast`` (a few steps per stage). Datasets that this machine
does not have (MNIST, CIFAR-10, ImageNet, ICDAR; Fashion-MNIST where Debian's package is not
installed) are replaced by synthetic images of the same channels, at most 32 pixels (64 for
AlexNet, whose pooling needs 63). Every config composes and builds by default; three run for
real in the default suite (QUICK_RUNS), the others under ``-m slow``: a `_cpu` variant
exercises the same pipeline as its paper config, and every paper config must name one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compaware.config import CONF_DIR, instantiate
from compaware.data import DEBIAN_FASHION_MNIST, DataInfo
from compaware.models import build_model
from compaware.train import train

EXPERIMENT_DIR = Path(CONF_DIR) / "experiment"
EXPERIMENTS = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))
# configs that are not a paper's table row: the comparison's schedule and a search
NOT_PAPER_CONFIGS = {"compare_fashion", "search_lowrank_lenet5"}
PAPER_CONFIGS = [e for e in EXPERIMENTS if e not in NOT_PAPER_CONFIGS and not e.endswith("_cpu")]
ON_THIS_MACHINE = {"fashion_mnist", "digits", "synthetic"}  # what a _cpu variant may use
INSTALLED = {"digits", "synthetic"} | ({"fashion_mnist"} if Path(DEBIAN_FASHION_MNIST).is_dir()
                                       else set())  # .ci/run installs Fashion-MNIST


def header(experiment: str) -> str:
    return (EXPERIMENT_DIR / f"{experiment}.yaml").read_text()


def smoke_size(cfg) -> int:
    """The image size of the smoke runs: small, as far as the model allows."""
    return min(cfg.data.image_size, 64 if cfg.model.get("name") == "alexnet" else 32)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}", fast=False)
    info = DataInfo(cfg.data.name, cfg.data.channels, smoke_size(cfg), 10, 100)
    assert build_model(cfg.model, info) is not None
    assert instantiate(cfg.regularizer, "regularizer") is not None
    assert instantiate(cfg.compress, "compress") is not None
    assert f"experiment={experiment}" in header(experiment)  # the command that runs it


@pytest.mark.parametrize("experiment", PAPER_CONFIGS)
def test_paper_config_names_its_cpu_variant_and_target(make_cfg, experiment):
    variants = [e for e in EXPERIMENTS if e.endswith("_cpu") and f"experiment={e}" in
                header(experiment)]
    assert variants, f"{experiment}.yaml names no CPU variant (experiment=<name>_cpu)"
    assert "Paper" in header(experiment)  # the number it targets
    for variant in variants:
        assert make_cfg(f"experiment={variant}", fast=False).data.name in ON_THIS_MACHINE


def smoke_overrides(experiment: str, make_cfg) -> list[str]:
    """debug=fast, no latency, and synthetic data where the config's dataset is absent."""
    cfg = make_cfg(f"experiment={experiment}", fast=False)
    overrides = [f"experiment={experiment}", "bench.latency=false"]
    if cfg.data.name not in INSTALLED:
        overrides += ["data=synthetic", f"data.channels={cfg.data.channels}",
                      f"data.image_size={smoke_size(cfg)}", "data.num_classes=10",
                      "data.train_size=64", "data.test_size=32"]
    return overrides


# Real tiny runs in the default suite: one per regularizer family not run end to end by another
# test file (SSL's: test_ssl_compress.py, soft weight-sharing's: test_sws.py); every other
# config runs under -m slow (about 10-60 s each on a 2-core CPU, minutes for ResNet-50/AlexNet).
QUICK_RUNS = {"alvarez2016_dec3_synthetic_cpu", "alvarez2017_dec8_synthetic_cpu",
              "han2016_lenet300_fashion_cpu"}


@pytest.mark.parametrize("experiment", [
    e if e in QUICK_RUNS else pytest.param(e, marks=pytest.mark.slow)
    for e in EXPERIMENTS if e != "search_lowrank_lenet5"])  # the search: tests/test_sweeps.py
def test_experiment_runs_end_to_end(make_cfg, experiment):
    results = train(make_cfg(*smoke_overrides(experiment, make_cfg)))
    assert results["status"] == "completed"
    assert results["accuracy"]["compressed"] is not None
    assert results["params"]["compressed"] <= results["params"]["dense"]
