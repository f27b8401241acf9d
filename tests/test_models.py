"""The papers' architectures exactly, and torchvision classifiers adapted to the data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compaware.bench import count_macs, count_params
from compaware.config import UserError
from compaware.models.cifar import SSLConvNet, resnet20, resnet32
from compaware.models.lenet import MLP, LeNet5, LeNet300
from compaware.models.tv import torchvision_classifier
from compaware.residual import residual_blocks


@pytest.mark.parametrize(("factory", "params", "macs"), [
    (LeNet300, 266_610, 266_200),  # PAPERS.md G
    (LeNet5, 431_080, 2_293_000),
])
def test_lenet_sizes_match_the_papers(factory, params, macs):
    model = factory()
    assert count_params(model) == params
    assert count_macs(model, (1, 28, 28)) == macs


def test_lenet5_mac_count_by_hand():
    # conv1: 20 filters of 1×5×5 at 24×24; conv2: 50 of 20×5×5 at 8×8; fc1 800→500; fc2 500→10
    by_hand = 20 * 25 * 24 * 24 + 50 * 20 * 25 * 8 * 8 + 800 * 500 + 500 * 10
    assert count_macs(LeNet5(), (1, 28, 28)) == by_hand


def test_lenet_adapts_to_other_shapes():
    model = LeNet5(in_channels=3, num_classes=7, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_classifier_adapts_channels_and_classes():
    model = torchvision_classifier("resnet18", in_channels=1, num_classes=10, image_size=32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert model.conv1.in_channels == 1


def test_unknown_torchvision_name_lists_close_matches():
    with pytest.raises(UserError, match="resnet18"):
        torchvision_classifier("resnet1")


def _weights(model) -> int:
    """Conv and linear weights (no biases, no BN): what the papers call weights."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@pytest.mark.parametrize(("factory", "weights", "params", "blocks"), [
    # 16·3·9 + 2·3·(2·16·16·9) … + 64·10 weights; option-B projections add 16·32 + 32·64
    (resnet20, 270_896, 272_474, 9),
    (resnet32, 464_432, 466_906, 15),
    # Caffe's cifar10_full: 32·3·25 + 32·32·25 + 64·32·25 + 64·4·4·10
    (SSLConvNet, 89_440, 89_578, 0),
])
def test_cifar_networks_sizes(factory, weights, params, blocks):
    model = factory()
    assert _weights(model) == weights and count_params(model) == params
    assert len(residual_blocks(model)) == blocks
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_convs_have_no_bias_and_shapes_halve_per_stage():
    model = resnet20()
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.stride,
            model.layer3[0].conv2.out_channels] == [16, (2, 2), 64]


def test_ssl_mlp_sizes():
    model = MLP(hidden=[500, 300])
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [500, 300, 10]
    assert count_params(model) == 784 * 500 + 500 + 500 * 300 + 300 + 300 * 10 + 10
