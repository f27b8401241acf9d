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


@pytest.mark.parametrize("dead", [30, 290])  # 290 of 300: below the floor's 30 units
def test_dead_units_go_even_when_the_budget_is_met_and_below_the_floor(dead):
    model = LeNet300()
    with torch.no_grad():
        model.fc1.weight[:dead] = 0
        model.fc1.bias[:dead] = 0
    pruned, report = Prune(target="params:1")(model)
    assert pruned.fc1.out_features == 300 - dead and report["budget"]["reached"]


def test_round_to_is_kept_with_a_target():
    torch.manual_seed(0)
    # no floor: at 0.9, fc2 stops at rank 16 and only fc1's steps of 8 × (784 + 300)
    # parameters are left, so the plan lands at 0.224 (below the budget, so reached)
    compressed, report = SVD(target="params:0.25", round_to=8, max_layer_cut=1)(LeNet300())
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
    _, report = SVD(target="params:0.001", skip_last=True, max_layer_cut=1)(LeNet300())
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


def kept_shares(report: dict) -> dict[str, float]:
    """Per layer, the least it kept of its units (prune) and of its rank (svd)."""
    return {name: min(entry.get("kept", 1) / entry.get("units", 1),
                      entry.get("rank", 1) / entry.get("full_rank", 1))
            for name, entry in report.items()
            if name != "budget" and ("full_rank" in entry or "units" in entry)}


@pytest.mark.parametrize("max_layer_cut", [0.9, 0.5])
@pytest.mark.parametrize("model_name", ["lenet5", "resnet20"])
@pytest.mark.parametrize("method", [SVD, Prune, PruneSVD])
def test_no_layer_loses_more_than_max_layer_cut(method, model_name, max_layer_cut):
    # a budget far below what the floor allows: every layer is pushed to its floor
    make, input_shape = MODELS[model_name]
    torch.manual_seed(0)
    _, report = method(target="macs:0.01", input_shape=input_shape,
                       max_layer_cut=max_layer_cut)(make())
    kept = kept_shares(report)
    assert kept and min(kept.values()) >= 1 - max_layer_cut - 1e-9
    assert report["budget"]["reached"] is False
    assert f"compress.max_layer_cut={max_layer_cut:g}" in report["budget"]["reason"]


def test_the_default_floor_stops_the_rank_one_bottleneck():
    # measured on trained weights (docs/budgets.md): without a floor, macs:0.25 cut LeNet-5's
    # conv2 to rank 1 of 50; random weights do the same
    torch.manual_seed(0)
    _, unfloored = SVD(target="macs:0.25", input_shape=(1, 28, 28), max_layer_cut=1)(LeNet5())
    torch.manual_seed(0)
    _, report = SVD(target="macs:0.25", input_shape=(1, 28, 28))(LeNet5())
    assert unfloored["conv2"]["rank"] == 1
    assert report["conv2"]["rank"] >= 5 and report["budget"]["reached"]


@pytest.mark.parametrize("method", [SVD, PruneSVD])
@pytest.mark.parametrize("model_name", ["lenet5", "lenet300", "resnet20"])
def test_a_budget_leaves_the_classifier_whole(method, model_name):
    # measured on trained LeNet-5 (prune+svd at params:0.25): its 333 → 10 classifier at
    # rank 1 ended at 29 % fine-tuned; at rank r its logits span r dimensions
    make, input_shape = MODELS[model_name]
    torch.manual_seed(0)
    compressed, report = method(target="params:0.25", input_shape=input_shape)(make())
    classifier = [name for name, module in compressed.named_modules()
                  if isinstance(module, nn.Linear)][-1]
    assert report[classifier]["factorized"] is False
    assert "its classifier" in report[classifier]["reason"]
    assert report["budget"]["reached"]
    torch.manual_seed(0)
    _, per_layer = SVD(energy=0.5)(make())  # without a target the options decide
    assert per_layer[classifier]["factorized"]


@pytest.mark.parametrize("method", [SVD, Prune])
def test_a_budget_the_floor_stops_names_the_option_and_the_layers(method):
    torch.manual_seed(0)
    _, report = method(target="params:0.01", input_shape=(1, 28, 28))(LeNet300())
    reason = report["budget"]["reason"]
    assert "compress.max_layer_cut=0.9 keeps at least 10 %" in reason and "fc1" in reason


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half", True, None])
def test_an_invalid_max_layer_cut_names_the_option_and_its_range(value):
    for method in (SVD, Prune, PruneSVD):
        with pytest.raises(UserError, match=r"compress.max_layer_cut=.*compress.max_layer_cut "
                                            r"takes a number in \[0, 1\]"):
            method(target="params:0.5", input_shape=(1, 28, 28), max_layer_cut=value)


@pytest.mark.parametrize("method", [SVD, Prune, PruneSVD])
def test_max_layer_cut_without_a_target_is_an_error(method):
    with pytest.raises(UserError, match="compress.max_layer_cut=0.5 would be ignored"):
        method(target=None, max_layer_cut=0.5)


@pytest.mark.parametrize("compress", ["svd", "prune", "prune+svd"])
def test_the_configs_take_max_layer_cut(make_cfg, compress):
    def floors(*overrides: str) -> list[float]:
        compressor = instantiate(make_cfg(f"compress={compress}", "compress.target=params:0.5",
                                          *overrides).compress)
        parts = [compressor.prune, compressor.svd] if compress == "prune+svd" else [compressor]
        return [part.max_layer_cut for part in parts]

    assert set(floors("compress.max_layer_cut=0.75")) == {0.75}
    assert set(floors()) == {0.9}
