"""SVD compression: exact at full rank, smaller at low rank, and standalone once saved."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from compaware.compress import SVD
from compaware.compress.svd import choose_rank, factorize
from compaware.deploy.bench import count_macs, count_params
from compaware.layers import is_grouped, weight_layers, weight_matrix
from compaware.models.lenet import LeNet5
from compaware.models.tv import torchvision_classifier
from tests.conftest import assert_reloads_without_compaware


@pytest.mark.parametrize("layer", [
    nn.Linear(12, 7),
    nn.Conv2d(3, 8, 3, padding=1),
    nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1)),
    nn.Conv2d(4, 6, 1, bias=False),
    nn.Conv2d(4, 6, (5, 1), padding=(2, 0)),  # DecomposeMe's vertical and horizontal 1D convs
    nn.Conv2d(4, 6, (1, 5), stride=(1, 2), padding=(0, 2)),
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
    nn.Conv2d(4, 6, 4, stride=3, padding="valid", dilation=2),
    nn.Conv1d(3, 5, 3, padding=1),
])
def test_factorization_at_full_rank_is_exact(layer):
    w = layer.weight.detach().view(layer.weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    pair = factorize(layer, u, s, vh, len(s))
    x = {nn.Linear: torch.randn(2, 12), nn.Conv1d: torch.randn(2, 3, 16),
         nn.Conv2d: torch.randn(2, getattr(layer, "in_channels", 0), 16, 16)}[type(layer)]
    torch.testing.assert_close(pair(x), layer(x), atol=1e-5, rtol=1e-4)


def test_a_layer_is_factorized_only_where_it_gets_cheaper_in_macs():
    # Linear 10→10: rank r costs r·(10 + 10) MACs against 100, so r = 4 pays and r = 5 not.
    model = nn.Sequential(nn.Linear(10, 10))
    assert SVD(rank=4)(model)[1]["0"]["factorized"]
    assert SVD(rank=5)(model)[1]["0"] == {"rank": 5, "full_rank": 10, "factorized": False,
                                          "reason": "not cheaper at this rank"}


def test_factorized_strided_dilated_conv_mac_count_by_hand():
    # 6→8 channels, 3×3, stride 2, dilation 2 on 20×20: output (20 - 4 - 1) // 2 + 1 = 8.
    model = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, dilation=2))
    compressed, _ = SVD(rank=3)(model)
    assert count_macs(model, (6, 20, 20)) == 8 * 6 * 9 * 8 * 8
    assert count_macs(compressed, (6, 20, 20)) == (3 * 6 * 9 + 8 * 3) * 8 * 8


def test_grouped_and_depthwise_convs_are_skipped_with_a_logged_reason(caplog):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3, groups=2),
                          nn.Conv2d(16, 16, 3))
    with caplog.at_level(logging.INFO, logger="compaware.compress.svd"):
        compressed, report = SVD(rank=1)(model)
    for name in ("0", "1"):
        assert report[name] == {"factorized": False, "reason": "grouped conv"}
        assert compressed[int(name)].groups == model[int(name)].groups
        assert f"svd: {name} (Conv2d) left as it is: grouped conv" in caplog.text
    assert report["2"]["factorized"]


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x, x, x)[0])


def test_layers_whose_parent_reads_the_weight_are_skipped():
    # nn.MultiheadAttention hands self.out_proj.weight to a functional kernel.
    model = _Attention().eval()
    compressed, report = SVD(rank=2)(model)
    assert report["attn.out_proj"]["reason"] == "its parent reads the weight directly"
    assert report["mlp"]["factorized"]
    assert compressed(torch.randn(2, 5, 16)).shape == (2, 5, 16)  # still runs


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


def test_exactly_low_rank_layers_of_a_real_model_are_factorized_with_equal_outputs():
    # MobileNetV3: BN, hardswish, squeeze-excitation 1×1 convs, depthwise convs (skipped).
    torch.manual_seed(0)
    model = torchvision_classifier("mobilenet_v3_small", num_classes=10, image_size=32).eval()
    with torch.no_grad():
        for _, layer in weight_layers(model):
            if not is_grouped(layer):
                w = weight_matrix(layer)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                s[max(1, len(s) // 4):] = 0  # a quarter of the rank: always cheaper
                w.copy_((u * s) @ vh)
    compressed, report = SVD()(model)
    assert all(r["factorized"] != (r.get("reason") == "grouped conv") for r in report.values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), model(x), atol=1e-4, rtol=1e-3)
    assert count_params(compressed) < count_params(model) / 2
    assert count_macs(compressed, (3, 32, 32)) < count_macs(model, (3, 32, 32))


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
