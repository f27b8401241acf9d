"""The training loop, shared by every stage: plain pre-training, training with the
regularizer and fine-tuning the compressed model without it.

One epoch::

    for x, y in batches:                      # order seeded by (seed, epoch), shared by the ranks
        regularizer.ramp = ramp.at(step)      # the strength's warm-up (schedule.strength_ramp)
        loss = CE(model(x), y) + regularizer.penalty(model)        # under autocast (schedule.amp)
                                              # fine-tuning may distil: CE → compaware/distill.py
        if loss is not finite: schedule.on_nan decides: stop | skip_batch | restore
        loss.backward(); regularizer.after_backward(model); keep.after_backward(model)
        optimizer.step()                      # with N ranks, DDP averages the gradients
        if regularizer.every == "step": regularizer.prox(model, lr)
        if a preemption signal came: checkpoint this step and stop (compaware/preemption.py)
    if regularizer.every == "epoch": regularizer.prox(model, t)   # t = lr × steps, at the
                                                                  # epoch's mean ramp
    scheduler.step(); evaluate; log
    steering.after_epoch(...)                 # toward compress.target: the next epoch's lam
    checkpoint (atomic, rank 0 only)

Everything an epoch depends on is either in the checkpoint or derived from
(seed, epoch), so ``resume=true`` continues to the same final weights: from the end of
the last epoch, or, after a preemption, from the step where it stopped (that
checkpoint also holds the step, the epoch's running sums and the RNG state).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from compaware import checkpoint, distributed, preemption
from compaware.config import Amp, LrSchedule, OnNan, OptimizerName, ScheduleConfig, UserError
from compaware.data import Data, test_loader, train_loader
from compaware.distill import Distillation
from compaware.keep import KeepStructure
from compaware.regularizers import Regularizer

if TYPE_CHECKING:
    from compaware.steering import Steering

log = logging.getLogger(__name__)

MAX_RESTORES = 3  # on_nan=restore: retries of one epoch, each at half the lr, before giving up
MAX_SKIPPED = 10  # on_nan=skip_batch: this many non-finite losses in a row mean broken weights


@dataclass
class Stage:
    """One optimisation stage of the run."""

    name: str  # "train" or "finetune": checkpoint file name and TensorBoard prefix
    epochs: int
    lr: float
    regularizer: Regularizer
    strength_ramp: float = 0.0  # share of the stage over which the strength rises to lam
    keep: KeepStructure | None = None  # fine-tuning: what compression made (compaware/keep.py)
    distill: Distillation | None = None  # fine-tuning: learn the dense model's outputs too
    steering: Steering | None = None  # training toward a budget (compaware/steering.py)

    @property
    def prefix(self) -> str:
        return "" if self.name == "train" else f"{self.name}/"


@dataclass
class Training:
    """What a stage optimises and everything a checkpoint must hold to continue it."""

    model: nn.Module  # the module itself: weights, checkpoints, regularizer
    net: nn.Module  # what the forward pass goes through: the model or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # loss scaling for schedule.amp=fp16 (disabled otherwise)
    regularizer: Regularizer
    keep: KeepStructure | None = None
    distill: Distillation | None = None
    steering: Steering | None = None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "regularizer": self.regularizer.state_dict(),
                **({"steering": self.steering.state_dict()} if self.steering else {})}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # absent or empty when saved without fp16
            self.scaler.load_state_dict(state["scaler"])
        self.regularizer.load_state_dict(state["regularizer"])
        if self.steering and "steering" not in state:
            raise UserError("this checkpoint was written without steering toward the budget "
                            "(schedule.steer=false), so resuming it steered would be another "
                            "run: resume with schedule.steer=false, or start afresh.")
        if self.steering:
            self.steering.load_state_dict(state["steering"])

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate, now and for the rest of the schedule."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]


@dataclass
class Progress:
    """How far the current epoch got: the batches it consumed and its running sums."""

    batches: int = 0  # of this epoch's seeded order, including skipped ones
    skipped: int = 0  # non-finite losses skipped (schedule.on_nan=skip_batch)
    in_a_row: int = 0  # of those, the latest consecutive ones
    loss: float = 0.0
    loss_reg: float = 0.0
    correct: int = 0
    seen: int = 0

    @property
    def steps(self) -> int:
        return self.batches - self.skipped


@dataclass(frozen=True)
class StrengthRamp:
    """The share of the regularizer's strength in force at each SGD step of a stage: (k + 1)/n
    at its k-th step (counted from 0) for the first n steps, then 1.

    A function of the step alone, so a resumed run, also one resumed mid-epoch, ramps exactly
    as an uninterrupted one.
    """

    steps: int = 0  # n; 0: the whole strength from the first step

    @classmethod
    def over(cls, share: float, stage_steps: int) -> StrengthRamp:
        """The ramp over ``share`` of a stage of ``stage_steps`` steps."""
        return cls(math.ceil(share * stage_steps))

    def at(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps) if self.steps else 1.0

    def mean(self, first: int, count: int) -> float:
        """The mean over steps ``first`` … ``first + count − 1``: the share in force of a
        per-epoch prox, whose threshold sums those steps'."""
        return sum(self.at(k) for k in range(first, first + count)) / max(count, 1)


class NonFinite(Exception):
    """A NaN/Inf loss (or a prox on non-finite weights) at ``step``: schedule.on_nan decides."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(what)
        self.step, self.what = step, what


def make_optimizer(model: nn.Module, regularizer: Regularizer, schedule: ScheduleConfig,
                   lr: float) -> torch.optim.Optimizer:
    groups = [{"params": list(model.parameters())}, *regularizer.param_groups(model)]
    if schedule.optimizer == OptimizerName.adam:
        return torch.optim.Adam(groups, lr=lr, weight_decay=schedule.weight_decay)
    if schedule.optimizer == OptimizerName.adamw:  # the decay shrinks weights, not gradients
        return torch.optim.AdamW(groups, lr=lr, weight_decay=schedule.weight_decay)
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


def autocast(amp: Amp, device: torch.device) -> torch.autocast:
    """The mixed precision of the forward pass (a no-op for ``schedule.amp=none``)."""
    dtype = {Amp.bf16: torch.bfloat16, Amp.fp16: torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(training: Training, batches, progress: Progress, *,
                    schedule: ScheduleConfig, device: torch.device, steps: int,
                    writer: SummaryWriter, tag: str, first_step: int, desc: str,
                    ramp: StrengthRamp = StrengthRamp()) -> bool:
    """Continue the epoch from ``progress`` (updated in place) up to ``steps`` batches, the
    first of which is the stage's step ``first_step`` (for ``ramp`` and TensorBoard).

    Returns True when a preemption signal stopped it at a step boundary. A non-finite loss
    raises :class:`NonFinite`, unless ``schedule.on_nan=skip_batch`` skips the batch.
    """
    training.net.train()
    model, optimizer, regularizer = training.model, training.optimizer, training.regularizer
    bar = tqdm(batches, total=steps, initial=progress.batches, desc=desc, leave=False,
               disable=None if distributed.is_main() else True)
    for x, y in bar:
        if progress.batches == steps:
            break
        step = first_step + progress.batches
        regularizer.ramp = ramp.at(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if schedule.channels_last and x.dim() == 4:  # activations follow the input's layout;
            x = x.contiguous(memory_format=torch.channels_last)  # weights stay NCHW (proxes)
        with autocast(schedule.amp, device):
            logits = training.net(x)
        loss_ce = (training.distill.loss(logits.float(), x, y) if training.distill is not None
                   else F.cross_entropy(logits.float(), y))
        loss_reg = regularizer.penalty(model)
        loss = loss_ce + loss_reg
        progress.batches += 1
        if distributed.any_rank(not torch.isfinite(loss)):  # every rank takes the same branch
            if schedule.on_nan != OnNan.skip_batch:
                raise NonFinite(progress.batches, f"the loss became {loss.item()}")
            if progress.in_a_row + 1 == MAX_SKIPPED:
                raise NonFinite(progress.batches, f"the loss was not finite for {MAX_SKIPPED} "
                                                  f"batches in a row")
            progress.skipped, progress.in_a_row = progress.skipped + 1, progress.in_a_row + 1
            log.warning("%s: skipped batch %d, its loss is %s (schedule.on_nan=skip_batch)",
                        desc, progress.batches, loss.item())
            continue
        progress.in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.unscale_(optimizer)  # (fp16) the hook sees the true gradients
        regularizer.after_backward(model)
        if training.keep is not None:
            training.keep.after_backward(model)
        training.scaler.step(optimizer)
        training.scaler.update()
        if regularizer.every == "step":
            _prox(training, regularizer.prox_step(optimizer.param_groups[0]["lr"], 1),
                  progress.batches)

        writer.add_scalar(f"{tag}train/loss", loss.item(), step)
        writer.add_scalar(f"{tag}train/loss_reg", loss_reg.item(), step)
        if ramp.steps:
            writer.add_scalar(f"{tag}reg/ramp", regularizer.ramp, step)
        progress.loss += loss.item()
        progress.loss_reg += loss_reg.item()
        progress.correct += int((logits.argmax(1) == y).sum())
        progress.seen += len(y)
        bar.set_postfix(loss=f"{loss.item():.3f}",
                        acc=f"{100 * progress.correct / progress.seen:.1f}")
        if distributed.any_rank(preemption.requested() is not None):
            return True
    return False


def _prox(training: Training, step_size: float, step: int) -> None:
    try:
        training.regularizer.prox(training.model, step_size)
    except torch.linalg.LinAlgError as error:
        if all(torch.isfinite(p).all() for p in training.model.parameters()):
            raise UserError(f"the proximal step of {type(training.regularizer).__name__} "
                            f"failed on finite weights at step {step}: {error} This is a "
                            f"numerical failure of the decomposition, not a divergence; "
                            f"please report it with the run's config.") from error
        raise NonFinite(step, "the proximal step met non-finite weights") from None


SUMS = ("loss", "loss_reg", "correct", "seen")  # Progress fields that add up over the ranks


def epoch_metrics(progress: Progress) -> dict:
    """Mean loss, mean regularizer term and accuracy of the epoch, over all ranks."""
    loss, loss_reg, correct, seen, steps = distributed.sum_across_ranks(
        *(getattr(progress, key) for key in SUMS), progress.steps)
    return {"loss": loss / max(steps, 1), "loss_reg": loss_reg / max(steps, 1),
            "acc": 100 * correct / max(seen, 1)}


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) on the test set (each rank counts its share)."""
    model.eval()
    correct = seen = 0
    for x, y in test_loader(data, batch_size):
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        seen += len(y)
    correct, seen = distributed.sum_across_ranks(correct, seen)
    return 100 * correct / seen


def fit(model: nn.Module, data: Data, stage: Stage, schedule: ScheduleConfig, *, seed: int,
        device: torch.device, checkpoint_path: Path, writer: SummaryWriter, resume: bool,
        meta: dict, num_workers: int = 0) -> None:
    """Run ``stage`` to its last epoch, checkpointing (with ``meta``) after every epoch.

    With ``resume`` and an existing checkpoint, everything in :class:`Training` is
    restored and training goes on after the saved epoch, or at the saved step. A
    preemption signal ends the stage with a step checkpoint and
    :class:`~compaware.preemption.Preempted`.
    """
    stage.regularizer.check(model)
    stage.regularizer.setup(model, data.info)
    optimizer = make_optimizer(model, stage.regularizer, schedule, stage.lr)
    training = Training(
        model=model, net=model, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, schedule, stage.epochs),
        scaler=torch.amp.GradScaler(device.type, enabled=schedule.amp == Amp.fp16),
        regularizer=stage.regularizer, keep=stage.keep, distill=stage.distill,
        steering=stage.steering)
    start, progress, rng = 0, Progress(), None
    if resume and checkpoint_path.exists():
        state = checkpoint.load(checkpoint_path)
        training.load_state_dict(state)
        start, rng = state["epoch"], state.get("rng")
        progress = _progress_of_this_rank(state.get("progress"))
        log.info("%s: resuming %s from %s", stage.name,
                 f"epoch {start + 1} at batch {progress.batches}" if progress.batches
                 else f"after epoch {start}", checkpoint_path)
    training.net = distributed.wrap(model, device)

    steps_per_epoch = len(train_loader(data, schedule.batch_size, seed, 0))
    if schedule.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, schedule.max_steps_per_epoch)
    ramp = StrengthRamp.over(stage.strength_ramp, stage.epochs * steps_per_epoch)
    for epoch in range(start, stage.epochs):
        desc = f"{stage.name} {epoch + 1}/{stage.epochs}"
        restart = ((copy.deepcopy(training.state_dict()), replace(progress), rng)
                   if schedule.on_nan == OnNan.restore else None)  # the epoch's start, in memory
        for restores in range(MAX_RESTORES + 1):
            torch.manual_seed(seed * 100_003 + epoch)  # dropout and friends, reproducible on resume
            if rng is not None:
                _set_rng_state(rng)  # a preempted epoch: the RNG where it stopped
            lr = optimizer.param_groups[0]["lr"]
            batches = train_loader(data, schedule.batch_size, seed, epoch, num_workers,
                                   skip=progress.batches)
            try:
                if train_one_epoch(training, batches, progress, schedule=schedule, device=device,
                                   steps=steps_per_epoch, writer=writer, tag=stage.prefix,
                                   first_step=epoch * steps_per_epoch, desc=desc, ramp=ramp):
                    _save(training, checkpoint_path, epoch, meta, progress)
                    raise preemption.Preempted(preemption.requested(),
                                               f"{desc}, after batch {progress.batches}",
                                               checkpoint_path)
                if progress.batches and not progress.steps:
                    raise NonFinite(progress.batches, "every batch of the epoch was skipped")
                if stage.regularizer.every == "epoch":
                    stage.regularizer.ramp = ramp.mean(epoch * steps_per_epoch, progress.batches)
                    _prox(training, stage.regularizer.prox_step(lr, progress.steps),
                          progress.batches)
                break
            except NonFinite as error:
                if restart is None or restores == MAX_RESTORES:
                    raise _diverged(error, desc, checkpoint_path, schedule) from None
                training.load_state_dict(copy.deepcopy(restart[0]))
                progress, rng = replace(restart[1]), restart[2]
                training.scale_lr(0.5 ** (restores + 1))
                log.warning("%s: %s at batch %d; back to the epoch's start, retrying at lr %.4g "
                            "(schedule.on_nan=restore, %d/%d)", desc, error.what, error.step,
                            optimizer.param_groups[0]["lr"], restores + 1, MAX_RESTORES)
        training.scheduler.step()
        val_acc = evaluate(model, data, device)
        metrics = epoch_metrics(progress)
        stats = stage.regularizer.stats(model)

        step = (epoch + 1) * steps_per_epoch
        writer.add_scalar(f"{stage.prefix}train/acc", metrics["acc"], step)
        writer.add_scalar(f"{stage.prefix}val/acc", val_acc, step)
        writer.add_scalar(f"{stage.prefix}lr", lr, step)
        for key, value in stats.items():
            writer.add_scalar(f"{stage.prefix}reg/{key}", value, step)
        for key, figure in stage.regularizer.figures(model).items():
            writer.add_figure(f"{stage.prefix}reg/{key}", figure, step)
        if stage.steering:  # the strength of the next epoch, from the structure left now
            stage.steering.after_epoch(model, epoch, writer, step,
                                       next_lr=optimizer.param_groups[0]["lr"],
                                       steps=steps_per_epoch)
        writer.flush()
        skipped = f", non-finite batches skipped: {progress.skipped}" if progress.skipped else ""
        log.info("%s epoch %d/%d: loss %.4f (reg %.4f), train acc %.2f, val acc %.2f, lr %.4g%s%s",
                 stage.name, epoch + 1, stage.epochs, metrics["loss"], metrics["loss_reg"],
                 metrics["acc"], val_acc, lr, skipped, _summarize(stats))
        _save(training, checkpoint_path, epoch + 1, meta)
        progress, rng = Progress(in_a_row=progress.in_a_row), None  # a streak spans epochs
    stage.regularizer.ramp = 1.0  # warm-up done: compression and the stats see the strength in
    #                                force at the end (lam, × the steering factor where steered)


def _save(training: Training, path: Path, epoch: int, meta: dict,
          progress: Progress | None = None) -> None:
    """The stage's checkpoint (rank 0 writes it): after ``epoch`` epochs, plus, when the
    epoch stopped half-way, its ``progress`` (running sums of all ranks) and RNG state."""
    state = {"epoch": epoch, **training.state_dict(), **meta}
    if progress is not None:
        sums = dict(zip(SUMS, distributed.sum_across_ranks(*(getattr(progress, k) for k in SUMS)),
                        strict=True))
        state |= {"progress": asdict(replace(progress, **sums)), "rng": _rng_state()}
    if distributed.is_main():
        checkpoint.save(state, path)


def _progress_of_this_rank(saved: dict | None) -> Progress:
    """A preempted epoch's progress; its running sums (of all ranks) go to rank 0 alone."""
    if not saved:
        return Progress()
    progress = Progress(**saved)
    if not distributed.is_main():
        progress = replace(progress, loss=0.0, loss_reg=0.0, correct=0, seen=0)
    return progress


def _rng_state() -> dict:
    """The RNG states that dropout and augmentation draw from: the CPU's and this rank's GPU
    (every rank seeds and draws alike, so rank 0's state is every rank's)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _diverged(error: NonFinite, desc: str, checkpoint_path: Path,
              schedule: ScheduleConfig) -> UserError:
    last = (f"the last good checkpoint, {checkpoint_path}, is intact" if checkpoint_path.exists()
            else f"this stage has no checkpoint yet ({checkpoint_path} is written after its "
                 f"first epoch)")
    return UserError(f"{desc}: {error.what} at step {error.step} (training diverged); {last}. "
                     f"Lower schedule.lr or regularizer.lam, or choose the reaction with "
                     f"schedule.on_nan (stop, skip_batch, restore; this run: {schedule.on_nan}).")


def _summarize(stats: dict[str, float], shown: int = 8) -> str:
    """The first ``shown`` stats for the log line; all of them go to TensorBoard."""
    more = f", … ({len(stats) - shown} more in TensorBoard)" if len(stats) > shown else ""
    return "".join(f", {key} {value:.4g}" for key, value in list(stats.items())[:shown]) + more
