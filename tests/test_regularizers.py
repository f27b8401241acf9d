"""The regularizer interface: closed-form proxes, penalties, layer selection, and that the
nuclear norm really lowers the rank during training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compaware.config import DataConfig, ScheduleConfig, UserError
from compaware.data import build_data
from compaware.layers import LayerSelection
from compaware.loop import Stage, fit
from compaware.models.lenet import LeNet5
from compaware.regularizers import L1, L2, LowRank, Regularizer
from compaware.regularizers.lowrank import rank_of_spectrum, shrink_singular_values


@pytest.mark.parametrize("threshold", [0.8, 1e-3, 100.0])  # some, none, all σ zeroed
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (5, 5)])
def test_nuclear_prox_matches_closed_form(shape, threshold):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    u, s, vh = np.linalg.svd(w.numpy(), full_matrices=False)
    expected = (u * np.maximum(s - threshold, 0)) @ vh
    result = shrink_singular_values(w, threshold)
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-10)
    # and it is the minimiser of ½‖X − W‖² + t‖X‖_*: a random perturbation never does better
    objective = lambda x: 0.5 * (x - w).pow(2).sum() + threshold * torch.linalg.matrix_norm(  # noqa: E731
        x, "nuc")
    for _ in range(20):
        other = result + 0.01 * torch.randn(*shape, generator=g, dtype=torch.float64)
        assert objective(result) <= objective(other)


def test_prox_zeroes_small_singular_values_of_a_conv_in_place():
    conv = nn.Conv2d(4, 8, 3)
    numerical_rank = lambda w: rank_of_spectrum(torch.linalg.svdvals(w))  # noqa: E731
    before = numerical_rank(conv.weight.detach().view(8, -1))
    s = torch.linalg.svdvals(conv.weight.detach().view(8, -1))
    reg = LowRank(lam=1.0)
    reg.prox(nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 2)), step=float(s[3]))
    after = numerical_rank(conv.weight.detach().view(8, -1))
    assert before == 8 and after == 3  # σ_1..σ_3 survive a threshold of σ_4


def test_penalties_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 3.0]]))
        model[1].weight.copy_(torch.tensor([[-1.0, 1.0]]))
    assert L1(lam=0.5).penalty(model).item() == pytest.approx(0.5 * 8)
    assert L2(lam=0.5).penalty(model).item() == pytest.approx(0.25 * 16)
    assert L1(lam=0.5, skip_last=True).penalty(model).item() == pytest.approx(0.5 * 6)
    assert Regularizer().penalty(model).item() == 0.0


def test_layer_selection():
    model = LeNet5()
    names = lambda **kw: [n for n, _ in LayerSelection("x", **kw)(model)]  # noqa: E731
    assert names() == ["conv1", "conv2", "fc1", "fc2"]
    assert names(layers="conv") == ["conv1", "conv2"]
    assert names(layers="linear", skip_last=True) == ["fc1"]
    assert names(skip_first=True, skip_last=True) == ["conv2", "fc1"]


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"lam": -1}, "regularizer.lam"),
    ({"lam": "abc"}, "regularizer.lam"),
    ({"lam": 1, "every": "sometimes"}, "regularizer.every"),
    ({"lam": 1, "prox_step": "big"}, "regularizer.prox_step"),
    ({"lam": 1, "layers": "convs"}, "regularizer.layers"),
])
def test_bad_options_name_themselves(kwargs, option):
    with pytest.raises(UserError, match=option):
        LowRank(**kwargs)


def test_a_per_epoch_prox_steps_lr_times_the_steps_unless_the_papers_reading_is_asked():
    assert LowRank(lam=1).prox_step(0.1, 50) == pytest.approx(5.0)
    assert LowRank(lam=1, prox_step="lr").prox_step(0.1, 50) == pytest.approx(0.1)


def test_one_per_epoch_prox_shrinks_as_much_as_the_per_step_proxes_it_stands_for():
    """With no gradient in between, 10 proxes at t = lr are one at t = lr × 10: the
    per-epoch prox's threshold is the per-step ones' sum, so lam means the same at both."""
    torch.manual_seed(0)
    per_step, per_epoch = LeNet5(), LeNet5()
    per_epoch.load_state_dict(per_step.state_dict())
    reg = LowRank(lam=0.5)
    for _ in range(10):
        reg.prox(per_step, reg.prox_step(0.01, 1))
    reg.prox(per_epoch, reg.prox_step(0.01, 10))
    for name, layer in reg.layers(per_step):
        torch.testing.assert_close(layer.weight, dict(reg.layers(per_epoch))[name].weight,
                                   atol=1e-5, rtol=1e-4)


def _ranks_after_training(regularizer: Regularizer, tmp_path) -> dict[str, int]:
    torch.manual_seed(0)
    data = build_data(DataConfig(limit=512))
    model = LeNet5()
    schedule = ScheduleConfig(epochs=3, lr=0.05)
    from torch.utils.tensorboard import SummaryWriter

    fit(model, data, Stage("train", 3, 0.05, regularizer), schedule, seed=0,
        device=torch.device("cpu"), checkpoint_path=tmp_path / "ckpt.pt",
        writer=SummaryWriter(str(tmp_path / "tb")), resume=False, meta={})
    return {k: v for k, v in LowRank(lam=0).stats(model).items() if k.startswith("rank/")}


@pytest.mark.parametrize("every", ["epoch", "step"])
def test_training_with_the_nuclear_norm_lowers_rank(tmp_path, every):
    plain = _ranks_after_training(Regularizer(), tmp_path / "none")
    lowrank = _ranks_after_training(LowRank(lam=1.0, every=every), tmp_path / every)
    assert plain["rank/fc1"] == 500
    assert all(0 < lowrank[k] <= plain[k] for k in plain)
    assert lowrank["rank/fc1"] < plain["rank/fc1"] / 2


@pytest.mark.parametrize("regularizer", [L1(lam=1.0, layers="conv"), L2(lam=1.0, layers="conv"),
                                         LowRank(lam=1.0, layers="conv")])
def test_a_regularizer_with_no_layer_to_act_on_stops_clearly(regularizer):
    from compaware.models.lenet import LeNet300

    with pytest.raises(UserError, match="selects no layer of LeNet300.*regularizer.layers=conv"):
        regularizer.check(LeNet300())
    Regularizer().check(LeNet300())  # plain training always runs


def test_nuclear_prox_of_a_mostly_dead_layer():
    """Group sparsity leaves most rows exactly zero and the rest tiny: float32 ``eigh`` of
    such a Gram matrix fails to converge (so does float64 at times); the prox must not."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.randn(300, 784, generator=g) * 0.05
        live = torch.rand(300, generator=g) < 0.03
        w[~live] = 0
        w[live] *= torch.rand(int(live.sum()), 1, generator=g) * 1e-3
        for matrix in (w, w.T):
            result = shrink_singular_values(matrix, 1e-4)
            u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
            expected = (u * (s - 1e-4).clamp_min(0)) @ vh
            torch.testing.assert_close(result.double(), expected, atol=1e-6, rtol=0)
            assert (result[~live] == 0).all() if matrix is w else (result[:, ~live] == 0).all()


def test_nuclear_prox_where_eigh_returns_nan_on_finite_weights(monkeypatch):
    """float32 ``eigh`` returned NaN eigenvectors, without an error, for a LeNet-300-100 fc1
    whose rows SGL had shrunk to subnormal values (lowrank_sgl per step): the SVD does it."""
    eigh = torch.linalg.eigh

    def nan_vectors(gram):
        values, vectors = eigh(gram)
        return values, torch.full_like(vectors, float("nan"))

    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    expected = shrink_singular_values(w, 0.5)
    monkeypatch.setattr(torch.linalg, "eigh", nan_vectors)
    torch.testing.assert_close(shrink_singular_values(w, 0.5), expected, atol=1e-5, rtol=1e-5)


def test_nuclear_prox_takes_rows_of_subnormal_values_for_dead_ones():
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    w[:3] = torch.finfo(torch.float32).tiny / 4  # subnormal: what SGL's shrinking leaves
    result = shrink_singular_values(w, 0.1)
    assert (result[:3] == 0).all()
    torch.testing.assert_close(result[3:], shrink_singular_values(w[3:], 0.1))


def test_nuclear_prox_keeps_non_finite_weights_visible():
    w = torch.randn(4, 6)
    w[1, 2] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        shrink_singular_values(w, 0.1)


def test_a_prox_failure_on_finite_weights_is_not_called_divergence():
    from types import SimpleNamespace

    from compaware.loop import NonFinite, _prox

    class Failing(Regularizer):
        def prox(self, model, step):
            raise torch.linalg.LinAlgError("eigh failed to converge")

    model = nn.Linear(3, 2)
    with pytest.raises(UserError, match="failed on finite weights"):
        _prox(SimpleNamespace(regularizer=Failing(), model=model), 0.1, 7)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFinite):
        _prox(SimpleNamespace(regularizer=Failing(), model=model), 0.1, 7)
