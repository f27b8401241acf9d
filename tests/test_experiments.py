"""Every experiment config composes and builds its model, regularizer and compressor."""

from __future__ import annotations

from pathlib import Path

import pytest

from compaware.config import CONF_DIR, instantiate
from compaware.data import DataInfo
from compaware.models import build_model

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}", fast=False)
    assert build_model(cfg.model, DataInfo(cfg.data.name, 1, 28, 10, 100)) is not None
    assert instantiate(cfg.regularizer, "regularizer") is not None
    assert instantiate(cfg.compress, "compress") is not None
    header = (Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    assert f"experiment={experiment}" in header  # the command that runs it
