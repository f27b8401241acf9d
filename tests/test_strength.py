"""What a strength means and how it is ramped in: every regularizer scales its penalty,
subgradient and prox threshold by ``ramp``, the loop sets it per step from
``schedule.strength_ramp``, and lam's effect does not depend on the steps per epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from compaware import checkpoint, loop
from compaware.config import DataConfig, ScheduleConfig
from compaware.data import build_data
from compaware.loop import Stage, StrengthRamp, fit
from compaware.models.lenet import LeNet5, LeNet300
from compaware.preemption import Preempted
from compaware.regularizers import L1, L2, SGL, SSL, LowRank, LowRankSGL, Regularizer
from compaware.train import train


def test_the_ramp_rises_linearly_to_one_then_stays():
    ramp = StrengthRamp.over(0.5, 8)  # 4 steps
    assert [ramp.at(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp.mean(0, 4) == pytest.approx(0.625) and ramp.mean(4, 4) == 1.0
    assert StrengthRamp.over(0.0, 8).at(0) == 1.0  # no ramp: the whole strength at once
    assert StrengthRamp.over(1.0, 3).at(2) == 1.0  # a ramp over the whole stage ends at 1


def _model_for(reg: Regularizer) -> nn.Module:
    torch.manual_seed(0)
    return LeNet300() if isinstance(reg, SSL) else LeNet5()


@pytest.mark.parametrize("make", [lambda: L1(lam=1e-3), lambda: L2(lam=1e-2),
                                  lambda: SSL(filter=0.01, channel=0.01)],
                         ids=["l1", "l2", "ssl"])
def test_a_penalty_and_its_gradient_scale_with_the_ramp(make):
    full, half = make(), make()
    half.ramp = 0.5
    values, grads = [], []
    for reg in (full, half):
        model = _model_for(reg)
        value = reg.penalty(model)
        if value.requires_grad:
            value.backward()
        reg.after_backward(model)  # SSL adds its subgradient here
        values.append(value.item())
        grads.append(model.fc1.weight.grad)
    assert values[1] == pytest.approx(values[0] / 2, rel=1e-6)
    torch.testing.assert_close(grads[1], grads[0] / 2)


@pytest.mark.parametrize("make", [lambda: LowRank(lam=2.0), lambda: SGL(lam=0.5),
                                  lambda: LowRankSGL(lam=2.0, tau=0.5),
                                  lambda: SSL(filter=1.0, channel=1.0, method="proximal")],
                         ids=["lowrank", "sgl", "lowrank_sgl", "ssl"])
def test_a_prox_at_ramp_r_thresholds_as_one_with_r_times_the_step(make):
    ramped, scaled = make(), make()
    ramped.ramp = 0.25
    a, b = _model_for(ramped), _model_for(scaled)
    ramped.prox(a, 0.2)
    scaled.prox(b, 0.05)
    untouched = _model_for(scaled).state_dict()
    assert not all(torch.equal(b.state_dict()[k], untouched[k]) for k in untouched)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], atol=1e-6, rtol=1e-5)


class Recorder(Regularizer):
    """Records the ramp of each penalty and the (ramp, step) of each prox."""

    def __init__(self, every: str) -> None:
        super().__init__(lam=1.0)
        self.every = every
        self.penalties: list[float] = []
        self.proxes: list[tuple[float, float]] = []

    def penalty(self, model: nn.Module) -> torch.Tensor:
        self.penalties.append(self.ramp)
        return super().penalty(model)

    def prox(self, model: nn.Module, step: float) -> None:
        self.proxes.append((self.ramp, step))


def _fit(regularizer: Regularizer, tmp_path: Path, *, limit: int, epochs: int,
         strength_ramp: float = 0.0) -> None:
    """``epochs`` of LeNet-5 on the first ``limit`` digits, 64 a batch, at a constant lr 0.1."""
    torch.manual_seed(0)
    schedule = ScheduleConfig(epochs=epochs, lr=0.1, lr_schedule="constant")
    fit(LeNet5(), build_data(DataConfig(limit=limit)),
        Stage("train", epochs, 0.1, regularizer, strength_ramp), schedule, seed=0,
        device=torch.device("cpu"), checkpoint_path=tmp_path / "ckpt.pt",
        writer=SummaryWriter(str(tmp_path / "tb")), resume=False, meta={})


def test_the_loop_ramps_the_strength_per_step_and_ends_at_full_strength(tmp_path):
    per_step, per_epoch = Recorder("step"), Recorder("epoch")
    for reg in (per_step, per_epoch):  # 2 epochs of 4 steps, ramp over the first 4
        _fit(reg, tmp_path / reg.every, limit=256, epochs=2, strength_ramp=0.5)
        assert reg.ramp == 1.0
    assert per_step.penalties == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [ramp for ramp, _ in per_step.proxes] == per_step.penalties
    # a per-epoch prox: the epoch's mean ramp, on the threshold of its 4 steps (t = 4 lr)
    assert per_epoch.proxes == [(pytest.approx(0.625), pytest.approx(0.4)),
                                (1.0, pytest.approx(0.4))]


@pytest.mark.parametrize("every", ["epoch", "step"])
def test_the_same_lam_thresholds_as_much_on_half_the_data_over_as_many_steps(tmp_path, every):
    """1 epoch of 4 steps or 2 epochs of 2 (a dataset half as large): the same SGD steps, so
    the same summed prox threshold, whether the prox runs per epoch or per step."""
    totals = []
    for limit, epochs in ((256, 1), (128, 2)):
        reg = Recorder(every)
        _fit(reg, tmp_path / f"{limit}", limit=limit, epochs=epochs)
        totals.append(sum(ramp * step for ramp, step in reg.proxes))
    assert totals == [pytest.approx(0.4), pytest.approx(0.4)]


# Per-step SGL, its strength ramped over the whole stage: 3 epochs of 4 steps.
RAMPED = ("regularizer=sgl", "regularizer.every=step", "regularizer.lam=0.02",
          "compress=prune", "schedule.epochs=3", "schedule.strength_ramp=1.0",
          "bench.latency=false")


def _stage_weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / f"{stage}.pt")["model"]


def test_a_run_preempted_mid_ramp_resumes_to_the_same_weights(make_cfg, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(make_cfg(*RAMPED, run_dir=reference))
    unramped = tmp_path / "unramped"
    train(make_cfg(*RAMPED[:-2], "schedule.strength_ramp=0", run_dir=unramped))

    calls = []

    def signal_at_step_6() -> int | None:  # training epoch 2, after its second step
        calls.append(1)
        return 15 if len(calls) == 6 else None

    monkeypatch.setattr(loop.preemption, "requested", signal_at_step_6)
    with pytest.raises(Preempted):
        train(make_cfg(*RAMPED, run_dir=tmp_path / "b"))
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "b" / "checkpoints" / "train.pt")["progress"]["batches"] == 2
    train(make_cfg(*RAMPED, "resume=true", run_dir=tmp_path / "b"))

    for stage in ("train", "finetune"):
        a, b = _stage_weights(reference, stage), _stage_weights(tmp_path / "b", stage)
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    ramped, other = _stage_weights(reference, "train"), _stage_weights(unramped, "train")
    assert not all(torch.equal(ramped[k], other[k]) for k in ramped)  # the ramp mattered
