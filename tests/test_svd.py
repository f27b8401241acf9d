"""SVD compression: exact at full rank, smaller at low rank, and standalone once saved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compaware.bench import count_macs, count_params
from compaware.compress import SVD
from compaware.compress.svd import choose_rank, factorize
from compaware.models.lenet import LeNet5
from tests.conftest import assert_reloads_without_compaware


@pytest.mark.parametrize("layer", [
    nn.Linear(12, 7),
    nn.Conv2d(3, 8, 3, padding=1),
    nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1)),
    nn.Conv2d(4, 6, 1, bias=False),
    nn.Conv1d(3, 5, 3, padding=1),
])
def test_factorization_at_full_rank_is_exact(layer):
    w = layer.weight.detach().view(layer.weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    pair = factorize(layer, u, s, vh, len(s))
    x = {nn.Linear: torch.randn(2, 12), nn.Conv1d: torch.randn(2, 3, 16),
         nn.Conv2d: torch.randn(2, getattr(layer, "in_channels", 0), 16, 16)}[type(layer)]
    torch.testing.assert_close(pair(x), layer(x), atol=1e-5, rtol=1e-4)


def _low_rank_lenet(rank: int) -> nn.Module:
    """LeNet-5 whose conv2 and fc1 have exactly rank ``rank``."""
    torch.manual_seed(0)
    model = LeNet5()
    with torch.no_grad():
        for layer in (model.conv2, model.fc1):
            w = layer.weight.view(layer.weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            s[rank:] = 0
            w.copy_((u * s) @ vh)
    return model


def test_exactly_low_rank_layers_are_factorized_with_equal_outputs():
    model = _low_rank_lenet(rank=4)
    compressed, report = SVD()(model)
    assert report["conv2"] == {"rank": 4, "full_rank": 50, "factorized": True}
    assert report["fc1"]["rank"] == 4 and not report["conv1"]["factorized"]
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(compressed(x), model(x), atol=1e-4, rtol=1e-4)
    assert count_params(compressed) < count_params(model) / 4
    assert count_macs(compressed, (1, 28, 28)) < count_macs(model, (1, 28, 28))
    assert isinstance(model.fc1, nn.Linear)  # the trained model is left as it was


def test_factorized_mac_count_by_hand():
    compressed, report = SVD(rank=4)(_low_rank_lenet(4))
    assert all(r["factorized"] and r["rank"] == 4 for r in report.values())
    conv1 = 4 * 25 * 24 * 24 + 20 * 4 * 24 * 24  # 5×5 filters at 24×24, then 1×1
    conv2 = 4 * 500 * 8 * 8 + 50 * 4 * 8 * 8
    fc1 = 800 * 4 + 4 * 500
    fc2 = 500 * 4 + 4 * 10
    assert count_macs(compressed, (1, 28, 28)) == conv1 + conv2 + fc1 + fc2


def test_full_rank_model_is_left_unchanged():
    model = LeNet5()
    compressed, report = SVD()(model)
    assert not any(r["factorized"] for r in report.values())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(compressed(x), model(x))


def test_rank_choice():
    s = torch.tensor([4.0, 2.0, 1.0, 1e-9])
    assert choose_rank(s, energy=1.0, threshold=1e-5, max_rank=None) == 3
    # cumulative energy Σσ²: 16/21 = 0.76, 20/21 = 0.95, 1
    assert choose_rank(s, energy=0.75, threshold=1e-5, max_rank=None) == 1
    assert choose_rank(s, energy=0.9, threshold=1e-5, max_rank=None) == 2
    assert choose_rank(s, energy=0.99, threshold=1e-5, max_rank=None) == 3
    assert choose_rank(s, energy=1.0, threshold=1e-5, max_rank=2) == 2
    assert choose_rank(torch.zeros(3), energy=1.0, threshold=1e-5, max_rank=None) == 1


def test_compressed_model_reloads_without_compaware(tmp_path):
    compressed, _ = SVD()(_low_rank_lenet(4))
    assert_reloads_without_compaware(compressed, torch.randn(3, 1, 28, 28), tmp_path)
    assert (tmp_path / "m.pt2").stat().st_size > 0
