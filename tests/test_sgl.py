"""Sparse group lasso over units and its low-rank combination: the prox against its closed
form, exact zero groups, the groups (bias and BatchNorm included), per-layer strengths,
τ = 0 / 1 as sgl / lowrank, and training that removes units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compaware.config import UserError
from compaware.models.lenet import LeNet5, LeNet300
from compaware.regularizers import SGL, LowRank, LowRankSGL, Regularizer
from compaware.regularizers.sgl import sgl_prox


def test_sgl_prox_matches_closed_form_and_minimises():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    l1, group = 0.3, 1.5
    soft = np.sign(x.numpy()) * np.maximum(np.abs(x.numpy()) - l1, 0)
    norms = np.linalg.norm(soft, axis=1, keepdims=True)
    expected = soft * np.maximum(1 - group / np.maximum(norms, 1e-300), 0)
    result = sgl_prox(x, l1, group)
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-12)
    # the minimiser of ½‖Y − X‖² + l1·‖Y‖₁ + group·Σ‖Y_n‖₂: no perturbation does better
    objective = lambda y: (0.5 * (y - x).pow(2).sum() + l1 * y.abs().sum()  # noqa: E731
                           + group * y.norm(dim=1).sum())
    for _ in range(20):
        other = result + 0.01 * torch.randn(6, 9, generator=g, dtype=torch.float64)
        assert objective(result) <= objective(other)


def test_a_group_below_the_threshold_becomes_exactly_zero():
    x = torch.tensor([[0.3, -0.4, 0.0], [3.0, 0.0, -4.0], [0.0, 0.0, 0.0]])  # norms 0.5, 5, 0
    result = sgl_prox(x, 0.0, 1.0)
    assert torch.equal(result[0], torch.zeros(3)) and torch.equal(result[2], torch.zeros(3))
    torch.testing.assert_close(result[1], x[1] * 0.8)  # norm 5 → 4, direction kept
    assert torch.equal(sgl_prox(x, 0.0, 0.0), x)


def test_a_units_group_holds_its_bias_and_the_batchnorm_after_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    reg = SGL(lam=1.0, alpha=0.0)
    units = reg.units(model)
    assert [u.name for u in units] == ["0"] and units[0].norm is model[1]  # output layer skipped
    assert units[0].matrix().shape == (4, 9 + 1 + 2)
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1)
        model[0].weight[1:] *= 100  # units 1-3 survive a threshold that kills unit 0
    norms = units[0].matrix().norm(dim=1)
    output_layer = model[4].weight.detach().clone()
    reg.prox(model, step=float(norms[0] + 1e-3) / math.sqrt(12))
    for p in (model[0].weight, model[0].bias, model[1].weight, model[1].bias):
        assert torch.all(p[0] == 0) and torch.all(p[1:] != 0)
    assert torch.equal(model[4].weight, output_layer)


def test_group_shrink_is_weighted_by_sqrt_group_size_and_strength_is_per_layer():
    torch.manual_seed(0)
    model = LeNet300()
    fc1, fc3 = model.fc1.weight.detach().clone(), model.fc3.weight.detach().clone()
    groups = torch.cat([model.fc2.weight, model.fc2.bias[:, None]], 1).detach()
    reg = SGL(lam=0.01, alpha=0.0, lam_first=0.0, first_layers=1)
    reg.prox(model, step=0.5)
    assert torch.equal(model.fc1.weight, fc1)  # λ = 0 on the first layer
    after = torch.cat([model.fc2.weight, model.fc2.bias[:, None]], 1).detach()
    shrink = 0.5 * 0.01 * math.sqrt(301)  # P = 300 weights + 1 bias
    torch.testing.assert_close(after.norm(dim=1), (groups.norm(dim=1) - shrink).clamp_min(0))
    assert torch.equal(model.fc3.weight, fc3)  # the output layer: skipped by default


def test_stats_count_live_units_and_zero_groups():
    model = LeNet5()
    with torch.no_grad():
        model.conv1.weight[:5] = 0
        model.conv1.bias[:5] = 0
        model.fc1.weight[:100] = 0  # bias left: not a zero group
    stats = SGL(lam=0.1).stats(model)
    assert stats["units/conv1"] == 15 and stats["zero_groups/conv1"] == pytest.approx(0.25)
    assert stats["units/fc1"] == 500 and stats["zero_groups/conv2"] == 0
    assert "units/fc2" not in stats  # the output layer is skipped by default
    assert stats["units"] == 15 + 50 + 500 and stats["objective"] > 0


def _prox_result(regularizer, step: float = 0.2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LeNet5()
    regularizer.prox(model, step)
    return model.state_dict()


@pytest.mark.parametrize(("tau", "same_as"), [
    (1.0, LowRank(lam=0.5, skip_last=True)),
    (0.0, SGL(lam=0.5, alpha=0.3)),
])
def test_tau_one_is_lowrank_and_tau_zero_is_sgl(tau, same_as):
    combined = _prox_result(LowRankSGL(lam=0.5, tau=tau, alpha=0.3))
    alone, untouched = _prox_result(same_as), _prox_result(Regularizer())
    assert all(torch.equal(combined[k], alone[k]) for k in alone)
    assert not all(torch.equal(combined[k], untouched[k]) for k in alone)


def test_lowrank_sgl_applies_both_proxes():
    reg = LowRankSGL(lam=2.0, tau=0.5, alpha=0.0)
    torch.manual_seed(0)
    model = LeNet5()
    reg.prox(model, 0.1)
    stats = reg.stats(model)
    assert stats["rank/fc1"] < 500 and stats["units/fc1"] < 500
    assert stats["objective"] == pytest.approx(stats["nuclear_norm"] * 2.0 * 0.5
                                               + 0.5 * stats["sgl_objective"])


@pytest.mark.parametrize(("cls", "kwargs", "option"), [
    (SGL, {"lam": 1, "alpha": 1.5}, "regularizer.alpha"),
    (SGL, {"lam": 1, "alpha": -0.1}, "regularizer.alpha"),
    (SGL, {"lam": -1}, "regularizer.lam"),
    (SGL, {"lam": 1, "lam_first": -0.5}, "regularizer.lam_first"),
    (SGL, {"lam": 1, "first_layers": 1.5}, "regularizer.first_layers"),
    (LowRankSGL, {"lam": 1, "tau": 1.1}, "regularizer.tau"),
    (LowRankSGL, {"lam": 1, "tau": -0.5}, "regularizer.tau"),
    (LowRankSGL, {"lam": 1, "every": "never"}, "regularizer.every"),
])
def test_bad_options_name_themselves(cls, kwargs, option):
    with pytest.raises(UserError, match=option):
        cls(**kwargs)


def test_a_run_logs_units_and_prunes_the_zero_ones_exactly(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from compaware.train import train

    # SGL λ = 2 on fc1 only (the first two layers get lam_first = 0): fc1 dies, and pruning
    # keeps one unit of it; the nuclear part acts on every layer.
    results = train(make_cfg("regularizer=lowrank_sgl", "regularizer.lam=2",
                             "regularizer.lam_first=0", "regularizer.first_layers=2",
                             "compress=prune+svd", "bench.latency=false"))
    assert results["accuracy"]["compressed"] == results["accuracy"]["dense"]
    stats = results["regularizer"]
    assert stats["units/fc1"] == 0 and stats["units/conv2"] == 50 and "rank/fc1" in stats
    # fc1 keeps one (zero) unit, so no unit of conv2 is read any more: conv2 keeps one too
    # (16 inputs of fc1), and shape removal leaves fc1 its bias
    assert results["compression"]["details"]["fc1"] == {"units": 500, "kept": 1, "zero_units": 500,
                                             "columns": 16, "live_columns": 0,
                                             "replaced": True}
    assert results["compression"]["details"]["conv2"]["kept"] == 1
    assert results["compression"]["details"]["fc1.linear"]["reason"] == "no weights"
    assert results["structure"]["compressed"]["fc2"] == [10, 1]
    assert results["params"]["compressed"] < results["params"]["dense"] / 10
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    assert {"reg/units/fc1", "reg/zero_groups/fc1", "reg/units", "reg/rank/fc1"} <= set(
        events.Tags()["scalars"])
