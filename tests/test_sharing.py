"""Magnitude pruning and k-means weight sharing (Han et al.), the fine-tuning constraint that
keeps their structure, and Deep Compression's chain of the two across runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from compaware.compress import KMeans, Magnitude
from compaware.compress.quantize import kmeans_1d
from compaware.config import UserError
from compaware.keep import KeepStructure
from compaware.models.lenet import LeNet5
from compaware.train import train


def test_magnitude_threshold_is_q_times_the_layer_std():
    torch.manual_seed(0)
    model = LeNet5()
    compressed, report = Magnitude(q=0.5)(model)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        before, after = model.get_submodule(name), compressed.get_submodule(name)
        threshold = 0.5 * before.weight.std().item()
        assert report[name]["threshold"] == pytest.approx(threshold)
        small = before.weight.abs() < threshold
        assert (after.weight[small] == 0).all()
        assert torch.equal(after.weight[~small], before.weight[~small])
        assert torch.equal(after.bias, before.bias)  # biases are not pruned
        assert report[name]["nonzero_fraction"] == pytest.approx(1 - small.float().mean().item())
    # a uniform layer: |w| < 0.5 std prunes about 0.5 · std / max = 0.5 / √3 of it
    assert report["fc1"]["nonzero_fraction"] == pytest.approx(1 - 0.5 / 3**0.5, abs=0.01)


def test_kmeans_recovers_clear_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([-1.0, 0.2, 3.0])
    values = (centers[torch.randint(3, (3000,))] + 0.01 * torch.randn(3000))
    centroids, cluster = kmeans_1d(values, 3, iterations=100)
    torch.testing.assert_close(centroids, centers, atol=0.005, rtol=0)
    assert torch.equal(centroids[cluster].round(decimals=1), values.round(decimals=1))


def test_kmeans_shares_the_non_zero_weights_and_keeps_zeros():
    torch.manual_seed(0)
    pruned, _ = Magnitude(q=1.0)(LeNet5())
    compressed, report = KMeans(linear_bits=3, conv_bits=4)(pruned)
    for name, bits in (("conv1", 4), ("conv2", 4), ("fc1", 3), ("fc2", 3)):
        w, before = compressed.get_submodule(name).weight, pruned.get_submodule(name).weight
        assert torch.equal(w == 0, before == 0)
        assert report[name]["shared_values"] == len(w[w != 0].unique()) <= 2**bits - 1
        assert report[name]["bits"] == bits


def _shared_layer() -> nn.Sequential:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, 0.5, -0.5])[torch.randint(3, (4, 6))])
    return nn.Sequential(layer)


def _step(model: nn.Module, constraint: KeepStructure, optimizer) -> Tensor:
    optimizer.zero_grad()
    model(torch.randn(8, 6)).pow(2).sum().backward()
    grad = model[0].weight.grad.clone()
    constraint.after_backward(model)
    optimizer.step()
    return grad


def test_keep_structure_trains_each_shared_value_by_its_mean_gradient():
    """The centroid update at one weight's pace: value − lr · mean of the members' gradients
    (plain SGD)."""
    model = _shared_layer()
    before = model[0].weight.detach().clone()
    constraint = KeepStructure(model, [["0.weight"]], shared=True)
    grad = _step(model, constraint, torch.optim.SGD(model.parameters(), lr=0.1))
    w = model[0].weight.detach()
    assert (w[before == 0] == 0).all()
    for value in (0.5, -0.5):
        members = before == value
        assert len(w[members].unique()) == 1
        assert w[members][0].item() == pytest.approx(value - 0.1 * grad[members].mean().item())


@pytest.mark.parametrize("shared", [True, False])
def test_keep_structure_holds_under_adam_with_weight_decay(shared):
    model = _shared_layer()
    before = model[0].weight.detach().clone()
    constraint = KeepStructure(model, [["0.weight"]], shared=shared)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(5):
        _step(model, constraint, optimizer)
    w = model[0].weight.detach()
    assert (w[before == 0] == 0).all() and (w[before != 0] != 0).all()
    distinct = len(w[before != 0].unique())
    assert distinct == 2 if shared else distinct == int((before != 0).sum())
    assert not torch.equal(w, before)  # and it did train


@pytest.mark.parametrize(("compressor", "option"), [
    (lambda: Magnitude(q=-1), "compress.q"),
    (lambda: KMeans(linear_bits=0), "compress.linear_bits"),
    (lambda: KMeans(entropy="huffman"), "compress.entropy"),
])
def test_bad_options_name_themselves(compressor, option):
    with pytest.raises(UserError, match=option):
        compressor()


def test_deep_compression_chain_prune_retrain_then_share(make_cfg, tmp_path):
    """Run A prunes and retrains with its zeros kept; run B starts from A's fine-tuned
    weights, shares the survivors by k-means and fine-tunes the shared values."""
    common = ("model=lenet300", "data.image_size=8", "regularizer=none", "bench.latency=false",
              "schedule.finetune_epochs=1")
    a = train(make_cfg(*common, "compress=magnitude", "compress.q=1.0",
                       run_dir=tmp_path / "a"))
    a_ratio = a["compression"]["nonzero_fraction"]
    assert 0.1 < a_ratio < 0.9  # after fine-tuning: still pruned
    b = train(make_cfg(*common, "compress=kmeans", "compress.linear_bits=3",
                       "schedule.epochs=0", f"init_from={tmp_path / 'a/checkpoints/finetune.pt'}",
                       run_dir=tmp_path / "b"))
    assert b["compression"]["nonzero_fraction"] == pytest.approx(a_ratio)
    assert b["accuracy"]["dense"] == a["accuracy"]["finetuned"]
    finetuned = torch.load(tmp_path / "b/checkpoints/finetune.pt", weights_only=True)["model"]
    for name in ("fc1", "fc2", "fc3"):
        w = finetuned[f"{name}.weight"]
        assert len(w[w != 0].unique()) <= 2**3 - 1  # still shared after fine-tuning
    results = json.loads((tmp_path / "b/results.json").read_text())
    storage = results["compression"]["storage"]
    assert results["bytes"]["compressed"] == storage["bytes"] == (
        tmp_path / "b" / storage["file"]).stat().st_size
    assert results["compression"]["storage_ratio"] == pytest.approx(
        32 * results["params"]["dense"] / (8 * storage["bytes"]))
    assert results["compression"]["storage_ratio"] > 1 / a_ratio  # pruned *and* shared
    assert (tmp_path / "b" / "model_compressed.pt2").exists()  # the standalone model too
