"""The papers' architectures exactly, and torchvision classifiers adapted to the data."""

from __future__ import annotations

import pytest
import torch

from compaware.bench import count_macs, count_params
from compaware.config import UserError
from compaware.models.lenet import LeNet5, LeNet300
from compaware.models.tv import torchvision_classifier


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
