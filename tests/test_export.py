"""A model torch.export cannot trace stops with a message naming the layer, before training."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from compaware.config import UserError
from compaware.deploy.export import check_exportable
from compaware.train import train


class DataDependentGate(nn.Module):
    """Python control flow on a tensor's value: runs eagerly, cannot be traced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


class GatedNet(nn.Sequential):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__(OrderedDict([
            ("conv", nn.Conv2d(in_channels, 4, 3, padding=1)),
            ("gate", DataDependentGate()),
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(4, num_classes)),
        ]))


def test_an_untraceable_model_names_the_layer():
    model = GatedNet()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # fine eagerly
    with pytest.raises(UserError, match=r"cannot be exported .* at gate \(DataDependentGate\)"):
        check_exportable(model, (1, 28, 28))


def test_train_stops_before_training(make_cfg, tmp_path):
    with pytest.raises(UserError, match=r"at gate \(DataDependentGate\)"):
        train(make_cfg("data=synthetic", f"model._target_={__name__}.GatedNet"))
    run = tmp_path / "run"  # claimed (the lock), but nothing trained and nothing written
    assert not list(run.glob("checkpoints/*")) and not list(run.glob("model_*"))
    assert not (run / "tb").exists()
