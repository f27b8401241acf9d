"""schedule.optimizer: AdamW's weight decay is decoupled from the adaptive step."""

from __future__ import annotations

import torch
from torch import nn

from compaware.config import ScheduleConfig
from compaware.loop import make_optimizer
from compaware.regularizers.base import Regularizer
from compaware.train import train


def _one_step(optimizer_name: str) -> torch.Tensor:
    """A weight of 10 after one step with a zero gradient (lr 0.1, weight decay 0.5)."""
    layer = nn.Linear(1, 1, bias=False)
    nn.init.constant_(layer.weight, 10.0)
    schedule = ScheduleConfig(optimizer=optimizer_name, weight_decay=0.5)
    optimizer = make_optimizer(layer, Regularizer(), schedule, lr=0.1)
    layer.weight.grad = torch.zeros_like(layer.weight)
    optimizer.step()
    return layer.weight.detach()


def test_adamw_decays_the_weights_apart_from_the_adaptive_step():
    layer = nn.Linear(1, 1)
    optimizer = make_optimizer(layer, Regularizer(), ScheduleConfig(optimizer="adamw"), lr=0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    # Decoupled: w ← w − lr·wd·w = 10 − 0.1·0.5·10, whatever the gradient's scale.
    torch.testing.assert_close(_one_step("adamw"), torch.tensor([[9.5]]))
    # Adam adds wd·w to the gradient, which its normalised first step turns into a step of lr.
    torch.testing.assert_close(_one_step("adam"), torch.tensor([[9.9]]), atol=1e-4, rtol=0)


def test_adamw_trains_from_the_command_line(make_cfg):
    cfg = make_cfg("data=synthetic", "data.train_size=64", "data.test_size=32",
                   "schedule.optimizer=adamw", "schedule.lr=1e-3", "schedule.weight_decay=0.01",
                   "bench.latency=false")
    assert train(cfg)["config"]["schedule"]["optimizer"] == "adamw"
