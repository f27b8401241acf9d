"""Knowledge distillation while fine-tuning (finetune.distill): the loss, its options, and a
run that uses it and resumes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compaware import checkpoint, loop
from compaware.config import FinetuneConfig, UserError, validate
from compaware.distill import Distillation
from compaware.train import train


def distill_loss(teacher: nn.Module, logits, x, y, **options) -> torch.Tensor:
    return Distillation(teacher, FinetuneConfig(distill=True, **options)).loss(logits, x, y)


def test_the_loss_is_the_formula():
    torch.manual_seed(0)
    teacher, x, y = nn.Linear(4, 3), torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    logits = torch.randn(5, 3)
    t, w = 3.0, 0.3
    p = torch.softmax(teacher(x) / t, 1)
    kl = (p * (p.log() - torch.log_softmax(logits / t, 1))).sum(1).mean()
    expected = (1 - w) * F.cross_entropy(logits, y) + w * t * t * kl
    got = distill_loss(teacher, logits, x, y, temperature=t, distill_weight=w)
    torch.testing.assert_close(got, expected)


def test_weight_zero_is_cross_entropy_and_a_perfect_student_pays_only_it():
    torch.manual_seed(0)
    teacher, x, y = nn.Linear(4, 3), torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    logits = torch.randn(5, 3)
    torch.testing.assert_close(distill_loss(teacher, logits, x, y, distill_weight=0.0),
                               F.cross_entropy(logits, y))
    same = teacher(x).detach()
    torch.testing.assert_close(distill_loss(teacher, same, x, y, distill_weight=0.25),
                               0.75 * F.cross_entropy(same, y))


def test_the_teacher_gets_no_gradient_and_stays_in_eval_mode():
    teacher = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    student = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    distill = Distillation(teacher, FinetuneConfig(distill=True))
    distill.loss(student(x), x, y).backward()
    assert not teacher.training and teacher[0].weight.grad is None
    assert student.weight.grad is not None
    once, twice = (distill.loss(student(x), x, y) for _ in range(2))
    assert torch.equal(once, twice)  # no dropout in the teacher: fixed targets


@pytest.mark.parametrize(("override", "option"), [
    ("finetune.temperature=0", "finetune.temperature"),
    ("finetune.temperature=-2", "finetune.temperature"),
    ("finetune.temperature=nan", "finetune.temperature"),
    ("finetune.distill_weight=1.5", "finetune.distill_weight"),
    ("finetune.distill_weight=-0.1", "finetune.distill_weight"),
])
def test_bad_options_name_the_option(make_cfg, override, option):
    with pytest.raises(UserError, match=option):
        validate(make_cfg(override))


class _Interrupted(Exception):
    pass


def test_distilled_fine_tuning_differs_and_resumes_exactly(make_cfg, tmp_path, monkeypatch):
    args = ("regularizer=none", "compress=prune", "compress.target=macs:0.5",
            "schedule.finetune_epochs=2", "bench.latency=false")
    plain = train(make_cfg(*args, run_dir=tmp_path / "plain"))
    reference = train(make_cfg(*args, "finetune.distill=true", run_dir=tmp_path / "a"))
    assert reference["accuracy"]["dense"] == plain["accuracy"]["dense"]
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "finetune.pt")["model"]
    p = checkpoint.load(tmp_path / "plain" / "checkpoints" / "finetune.pt")["model"]
    assert not all(torch.equal(a[k], p[k]) for k in a)  # the teacher changed the training

    real_save, saves = checkpoint.save, []

    def save_then_stop(state, path):  # dies after fine-tuning's first epoch
        real_save(state, path)
        saves.append(path)
        if len(saves) == 2:  # train epoch 1, finetune epoch 1
            raise _Interrupted

    monkeypatch.setattr(loop.checkpoint, "save", save_then_stop)
    with pytest.raises(_Interrupted):
        train(make_cfg(*args, "finetune.distill=true", run_dir=tmp_path / "b"))
    monkeypatch.undo()
    resumed = train(make_cfg(*args, "finetune.distill=true", "resume=true",
                             run_dir=tmp_path / "b"))
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "finetune.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["accuracy"] == reference["accuracy"]
