"""The default run compresses to a budget (compress=svd's ``target: macs:0.25``), and svd's
per-layer options beside that default ask for ``compress.target=null``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compaware.config import UserError, instantiate
from compaware.train import train


@pytest.mark.parametrize(("override", "default"), [("compress.energy=0.9", "1.0"),
                                                    ("compress.rank=4", "null")])
def test_a_per_layer_option_beside_the_default_target_asks_for_target_null(make_cfg, override,
                                                                            default):
    cfg = make_cfg(override)
    option = override.partition("=")[0].replace(".", r"\.")
    with pytest.raises(UserError, match=rf"compress\.target=macs:0\.25 .*add compress\.target="
                                        rf"null.*leave {option} at {default}\."):
        train(cfg)
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()
    per_layer = make_cfg(override, "compress.target=null").compress
    assert instantiate(per_layer, "compress").budget is None


def test_the_default_run_compresses_to_a_quarter_of_the_macs(make_cfg, tmp_path):
    train(make_cfg("bench.latency=false"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    budget = results["compression"]["details"]["budget"]
    assert (budget["kind"], budget["target"], budget["reached"]) == ("macs", 0.25, True)
    assert results["macs"]["compressed"] <= 0.25 * 1.03 * results["macs"]["dense"]
