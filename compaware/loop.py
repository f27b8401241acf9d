"""The training loop, shared by both stages: training with the regularizer and
fine-tuning the compressed model without it.

One epoch::

    for x, y in batches:                      # order seeded by (seed, epoch)
        loss = CE(model(x), y) + regularizer.penalty(model)
        loss.backward(); regularizer.after_backward(model); optimizer.step()
        if regularizer.every == "step": regularizer.prox(model, lr)
    if regularizer.every == "epoch": regularizer.prox(model, t)   # t from lr (and steps)
    scheduler.step(); evaluate; log; checkpoint (atomic)

Everything an epoch depends on is either in the checkpoint or derived from
(seed, epoch), so ``resume=true`` continues to the same final weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from compaware import checkpoint
from compaware.config import LrSchedule, OptimizerName, ScheduleConfig, UserError
from compaware.data import Data, test_loader, train_loader
from compaware.regularizers import Regularizer

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One optimisation stage of the run."""

    name: str  # "train" or "finetune": checkpoint file name and TensorBoard prefix
    epochs: int
    lr: float
    regularizer: Regularizer

    @property
    def prefix(self) -> str:
        return "" if self.name == "train" else f"{self.name}/"


def make_optimizer(model: nn.Module, regularizer: Regularizer, schedule: ScheduleConfig,
                   lr: float) -> torch.optim.Optimizer:
    groups = [{"params": list(model.parameters())}, *regularizer.param_groups(model)]
    if schedule.optimizer == OptimizerName.adam:
        return torch.optim.Adam(groups, lr=lr, weight_decay=schedule.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=schedule.momentum,
                           weight_decay=schedule.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig,
                   epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The lr schedule over ``epochs``, stepped once per epoch."""
    if schedule.lr_schedule == LrSchedule.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if schedule.lr_schedule == LrSchedule.step:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(schedule.lr_milestones),
                                                    gamma=schedule.lr_gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_one_epoch(model: nn.Module, batches, optimizer: torch.optim.Optimizer,
                    regularizer: Regularizer, device: torch.device, max_steps: int | None,
                    writer: SummaryWriter, tag: str, first_step: int, desc: str) -> dict:
    """One pass over ``batches``; returns mean loss, mean regularizer term, accuracy, steps."""
    model.train()
    total = {"loss": 0.0, "loss_reg": 0.0, "correct": 0, "seen": 0, "steps": 0}
    steps = len(batches) if max_steps is None else min(len(batches), max_steps)
    bar = tqdm(batches, total=steps, desc=desc, leave=False, disable=None)
    for x, y in bar:
        if total["steps"] == steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_ce = F.cross_entropy(logits, y)
        loss_reg = regularizer.penalty(model)
        loss = loss_ce + loss_reg
        if not torch.isfinite(loss):
            raise UserError(f"{desc}: the loss became {loss.item()} at step "
                            f"{total['steps'] + 1} (training diverged). Lower schedule.lr or "
                            f"regularizer.lam; the last good checkpoint is the previous epoch's.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        regularizer.after_backward(model)
        optimizer.step()
        if regularizer.every == "step":
            regularizer.prox(model, regularizer.prox_step(optimizer.param_groups[0]["lr"], 1))

        step = first_step + total["steps"]
        writer.add_scalar(f"{tag}train/loss", loss.item(), step)
        writer.add_scalar(f"{tag}train/loss_reg", loss_reg.item(), step)
        total["loss"] += loss.item()
        total["loss_reg"] += loss_reg.item()
        total["correct"] += int((logits.argmax(1) == y).sum())
        total["seen"] += len(y)
        total["steps"] += 1
        bar.set_postfix(loss=f"{loss.item():.3f}",
                        acc=f"{100 * total['correct'] / total['seen']:.1f}")
    n = max(total["steps"], 1)
    return {"loss": total["loss"] / n, "loss_reg": total["loss_reg"] / n,
            "acc": 100 * total["correct"] / max(total["seen"], 1), "steps": total["steps"]}


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) on the test set."""
    model.eval()
    correct = seen = 0
    for x, y in test_loader(data, batch_size):
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        seen += len(y)
    return 100 * correct / seen


def fit(model: nn.Module, data: Data, stage: Stage, schedule: ScheduleConfig, *, seed: int,
        device: torch.device, checkpoint_path: Path, writer: SummaryWriter, resume: bool,
        meta: dict, num_workers: int = 0) -> None:
    """Run ``stage`` to its last epoch, checkpointing (with ``meta``) after every epoch.

    With ``resume`` and an existing checkpoint, model, optimizer, scheduler and
    regularizer state are restored and training continues after the saved epoch.
    """
    stage.regularizer.check(model)
    stage.regularizer.setup(model, data.info)
    optimizer = make_optimizer(model, stage.regularizer, schedule, stage.lr)
    scheduler = make_scheduler(optimizer, schedule, stage.epochs)
    start = 0
    if resume and checkpoint_path.exists():
        state = checkpoint.load(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stage.regularizer.load_state_dict(state["regularizer"])
        start = state["epoch"]
        log.info("%s: resuming after epoch %d from %s", stage.name, start, checkpoint_path)

    steps_per_epoch = len(train_loader(data, schedule.batch_size, seed, 0))
    if schedule.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, schedule.max_steps_per_epoch)
    for epoch in range(start, stage.epochs):
        torch.manual_seed(seed * 100_003 + epoch)  # dropout and friends, reproducible on resume
        lr = optimizer.param_groups[0]["lr"]
        batches = train_loader(data, schedule.batch_size, seed, epoch, num_workers)
        metrics = train_one_epoch(model, batches, optimizer, stage.regularizer, device,
                                  schedule.max_steps_per_epoch, writer, stage.prefix,
                                  epoch * steps_per_epoch,
                                  f"{stage.name} {epoch + 1}/{stage.epochs}")
        if stage.regularizer.every == "epoch":
            stage.regularizer.prox(model, stage.regularizer.prox_step(lr, metrics["steps"]))
        scheduler.step()
        val_acc = evaluate(model, data, device)
        stats = stage.regularizer.stats(model)

        step = (epoch + 1) * steps_per_epoch
        writer.add_scalar(f"{stage.prefix}train/acc", metrics["acc"], step)
        writer.add_scalar(f"{stage.prefix}val/acc", val_acc, step)
        writer.add_scalar(f"{stage.prefix}lr", lr, step)
        for key, value in stats.items():
            writer.add_scalar(f"{stage.prefix}reg/{key}", value, step)
        for key, figure in stage.regularizer.figures(model).items():
            writer.add_figure(f"{stage.prefix}reg/{key}", figure, step)
        writer.flush()
        log.info("%s epoch %d/%d: loss %.4f (reg %.4f), train acc %.2f, val acc %.2f, lr %.4g%s",
                 stage.name, epoch + 1, stage.epochs, metrics["loss"], metrics["loss_reg"],
                 metrics["acc"], val_acc, lr, _summarize(stats))
        checkpoint.save({"epoch": epoch + 1, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "regularizer": stage.regularizer.state_dict(), **meta}, checkpoint_path)


def _summarize(stats: dict[str, float], shown: int = 8) -> str:
    """The first ``shown`` stats for the log line; all of them go to TensorBoard."""
    more = f", … ({len(stats) - shown} more in TensorBoard)" if len(stats) > shown else ""
    return "".join(f", {key} {value:.4g}" for key, value in list(stats.items())[:shown]) + more
