"""Compression to a budget (``compress.target``): svd, prune and prune+svd meet a params or
MACs budget within 3 % on LeNet-5, LeNet-300-100 and ResNet-20, keep round_to, report what
latency-aware refusals cost, and say so in results.json and the run summary."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from compaware.compress import SVD, Prune, PruneSVD
from compaware.compress.budget import TOLERANCE, Budget
from compaware.config import UserError
from compaware.deploy.bench import count_macs, count_params
from compaware.models.cifar import CifarResNet
from compaware.models.lenet import LeNet5, LeNet300
from compaware.summary import format_summary
from compaware.train import train
from tests.test_latency import FakeClock

MODELS = {"lenet5": (LeNet5, (1, 28, 28)), "lenet300": (LeNet300, (1, 28, 28)),
          "resnet20": (lambda: CifarResNet(3), (3, 32, 32))}


def cost(kind: str, model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """As results.json counts it."""
    return count_params(model) if kind == "params" else count_macs(model, input_shape)


@pytest.mark.parametrize("share", [0.5, 0.25])
@pytest.mark.parametrize("kind", ["params", "macs"])
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", [SVD, Prune, PruneSVD])
def test_a_budget_is_met_within_three_percent(method, model_name, kind, share):
    make, input_shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    compressed, report = method(target=f"{kind}:{share}", input_shape=input_shape)(model)
    achieved = cost(kind, compressed, input_shape) / cost(kind, model, input_shape)
    assert achieved == pytest.approx(share, rel=TOLERANCE)
    assert report["budget"] == {"kind": kind, "target": share,
                                "achieved": round(achieved, 4), "reached": True}


def test_bytes_are_four_per_parameter():
    model = LeNet300()
    compressed, report = SVD(target="bytes:0.25")(model)
    assert report["budget"]["achieved"] == round(count_params(compressed) / count_params(model), 4)


def test_svd_allocates_globally_not_uniformly():
    # fc1 holds 93 % of LeNet-5's parameters: cutting it alone is the cheapest way to a
    # quarter, where a uniform energy or rank would factorize every layer
    torch.manual_seed(0)
    _, report = SVD(target="params:0.25")(LeNet5())
    assert [name for name, entry in report.items()
            if name != "budget" and entry["factorized"]] == ["fc1"]


def test_dead_units_go_even_when_the_budget_is_met():
    model = LeNet300()
    with torch.no_grad():
        model.fc1.weight[:30] = 0
        model.fc1.bias[:30] = 0
    pruned, report = Prune(target="params:1")(model)
    assert pruned.fc1.out_features == 270 and report["budget"]["reached"]


def test_round_to_is_kept_with_a_target():
    torch.manual_seed(0)
    compressed, report = SVD(target="params:0.25", round_to=8)(LeNet300())
    ranks = [entry["rank"] for name, entry in report.items()
             if name != "budget" and entry["factorized"]]
    assert ranks and all(rank % 8 == 0 for rank in ranks)
    assert report["budget"]["achieved"] == pytest.approx(0.25, rel=TOLERANCE)
    pruned, report = Prune(target="params:0.5", round_to=8)(LeNet300())
    assert pruned.fc1.out_features % 8 == 0 and pruned.fc2.out_features % 8 == 0
    assert report["budget"]["achieved"] == pytest.approx(0.5, rel=TOLERANCE)


@pytest.mark.parametrize(("method", "slow"), [
    (SVD, lambda layer: isinstance(layer, nn.Sequential)),  # every pair slower
    (Prune, lambda layer: True),  # the clock is the parameter count: make nothing faster
])
def test_latency_aware_refusals_leave_the_budget_unreached_with_the_reason(method, slow):
    torch.manual_seed(0)
    compressor = method(target="params:0.5", latency_aware=True, input_shape=(1, 28, 28),
                        latency_batch=2)
    clock = FakeClock(slow, 1000) if method is SVD else (lambda layer, x: 1.0)
    _, report = compressor(LeNet300(), timer=clock)
    assert report["budget"]["reached"] is False
    assert "latency_aware" in report["budget"]["reason"]
    assert "fc1" in report["budget"]["reason"]


def test_an_unreachable_budget_is_reported_not_reached():
    _, report = SVD(target="params:0.001", skip_last=True)(LeNet300())
    assert report["budget"]["reached"] is False
    assert "smallest rank" in report["budget"]["reason"]


@pytest.mark.parametrize("spec", ["0.5", "params", "params:0", "params:1.5", "params:-1",
                                  "flops:0.5", "params:half", "params:nan", ":0.5"])
def test_an_invalid_target_names_the_option_and_what_it_takes(spec):
    for method in (SVD, Prune, PruneSVD):
        with pytest.raises(UserError, match=r"compress.target=.*takes kind:share with kind "
                                            r"one of params, macs, bytes, latency and share "
                                            r"in \(0, 1\]"):
            method(target=spec, input_shape=(1, 28, 28))


@pytest.mark.parametrize("kind", ["macs", "latency"])
def test_a_macs_or_latency_budget_needs_an_input_shape(kind):
    with pytest.raises(UserError, match="needs compress.input_shape"):
        SVD(target=f"{kind}:0.5")


@pytest.mark.parametrize(("method", "kwargs", "option"), [
    (SVD, {"energy": 0.9}, "compress.energy=0.9"),
    (SVD, {"rank": 4}, "compress.rank=4"),
    (Prune, {"ratio": 0.5}, "compress.ratio=0.5"),
    (PruneSVD, {"ratio": 0.5}, "compress.ratio=0.5"),
    (PruneSVD, {"energy": 0.9}, "compress.energy=0.9"),
])
def test_a_per_layer_option_beside_a_target_is_an_error(method, kwargs, option):
    with pytest.raises(UserError, match=f"{option} would be ignored"):
        method(target="params:0.5", **kwargs)


@pytest.mark.parametrize(("compress", "default"), [
    ("svd", Budget("macs", 0.25)), ("prune", None), ("prune+svd", None)])
def test_the_configs_take_a_target(make_cfg, compress, default):
    cfg = make_cfg(f"compress={compress}", "compress.target=params:0.5")
    assert instantiate(cfg.compress).budget == Budget("params", 0.5)
    assert instantiate(make_cfg(f"compress={compress}").compress).budget == default
    assert instantiate(make_cfg(f"compress={compress}", "compress.target=null").compress
                       ).budget is None


def test_a_run_reports_the_budget_in_results_and_summary(make_cfg, tmp_path, capsys):
    train(make_cfg("model=lenet300", "compress=prune+svd", "compress.target=macs:0.5",
                   "bench.latency=false"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    budget = results["compression"]["details"]["budget"]
    achieved = results["macs"]["compressed"] / results["macs"]["dense"]
    assert budget == {"kind": "macs", "target": 0.5, "achieved": round(achieved, 4),
                      "reached": True}
    assert f"budget: macs 0.5 asked, {budget['achieved']:.3g} reached" in capsys.readouterr().out


def test_the_summary_says_why_a_budget_was_not_reached():
    results = {"accuracy": {"dense": 98.0, "compressed": 90.0, "finetuned": None},
               "params": {"dense": 100, "compressed": 60}, "macs": {"dense": 100,
                                                                     "compressed": 60},
               "bytes": {"dense": 400, "compressed": 240}, "latency_ms": {}, "seconds": {},
               "compression": {"details": {"budget": {
                   "kind": "params", "target": 0.5, "achieved": 0.6, "reached": False,
                   "reason": "latency_aware kept fc1 dense"}}}}
    assert ("budget: params 0.5 asked, 0.6 reached (not reached: latency_aware kept fc1 "
            "dense)") in format_summary(results)
