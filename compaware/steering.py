"""Training toward a budget: the regularizer's strength steered so that, when training ends,
the structure its proximal steps left already meets ``compress.target``, and compression
removes what is zero instead of cutting a trained network down by force.

At the end of every epoch of the training stage (after the epoch's prox), with the budget
``kind:share`` (compaware/compress/budget.py)::

    remaining = cost of the model compressed with nothing cut but exact zeros / dense cost
    target    = 1 − (1 − share·(1 − MARGIN)) · min(1, epochs done / ramp epochs)
    heading   = remaining + (remaining − last epoch's remaining), within [remaining/MAX_STEP, 1]
    factor   ← factor · clip((heading / next epoch's target) ** GAIN, 1/MAX_STEP, MAX_STEP)
    if remaining > next target: factor ← the brake's (below)

``remaining`` is measured, not estimated: the run's own compressor, its budget set aside
(with a budget its per-layer options remove only zeros: svd keeps every non-zero singular
value, prune every live unit), compresses a copy, and the copy's parameters, MACs or bytes are
counted as the budget counts them. The target falls linearly from 1 to just below the
budget's share over ``schedule.steer_ramp`` of the stage's epochs, the way gradual pruning
schedules lower their sparsity target, then holds it. The strength in force is
``regularizer.lam`` × factor (× the warm-up ramp): a structure above its target raises it, one
below lowers it, so that units or singular values the prox took too early can grow back. The
factor is an integral controller on log λ (each step multiplies it), bounded per epoch by
``MAX_STEP`` and overall by ``BOUNDS``; it acts on where the structure is heading rather than
where it is, because a prox goes on removing for an epoch or two after the strength that
drives it stopped rising.

The brake is for the cliff: a nuclear norm's prox removes nothing until its threshold reaches
the bulk of a layer's spectrum, then most of it at once, and a controller that only looks back
would step over the edge (on digits it went from all MACs to 15 % in one epoch, aiming at
57 %). Before an epoch on the way down in which the strength rises, the controller applies a
whole epoch's prox (the next lr × the steps) to a copy of the model at the new strength and at the
present one, and predicts the remaining share as remaining × the ratio of the two (dividing
out what a prox on freshly thresholded weights removes at any strength); where that is below
the next target it takes, by bisection, the largest rise that is not (possibly none).

A regularizer steers only when its prox leaves the kind of structure the compressor removes
(``Regularizer.leaves``: lowrank's ranks for svd, sgl's and ssl's units for prune, both for
prune+svd); any other pair trains at ``regularizer.lam`` and compression alone meets the
budget, as the log says once. The controller's state is in the stage's checkpoint, so a
resumed run steers exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from compaware.compress import Compressor
from compaware.compress.budget import TOLERANCE, Budget
from compaware.regularizers import Regularizer

log = logging.getLogger(__name__)

GAIN = 2.0  # log-λ change per unit of log(remaining / target)
MAX_STEP = 1.5  # at most ×1.5 or ÷1.5 per epoch
BOUNDS = (1e-3, 1e3)  # the factor on regularizer.lam stays within these
# The steered structure ends this far (a share of the budget) below it: compressing a structure
# slightly above its budget is a cut of trained weights, which a planner may place badly.
MARGIN = TOLERANCE
BISECTIONS = 6  # of the brake's search: within 1/64 of the rise it would have made


def zeros_only(compressor: Compressor) -> Compressor:
    """A copy of ``compressor`` without its budget or its timings: it removes only what is
    exactly zero (with a budget set, its per-layer options are at their defaults)."""
    probe = copy.deepcopy(compressor)
    for part in (probe, *vars(probe).values()):
        if isinstance(part, Compressor):
            part.budget = None
            if part.latency is not None:
                part.latency.latency_aware = part.latency.check_layers = False
    return probe


@contextmanager
def quiet(logger: logging.Logger) -> Iterator[None]:
    """``logger`` holds back everything below an error while inside."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Steering:
    """The controller of one training stage; the loop calls :meth:`after_epoch` at the end of
    each epoch and checkpoints :meth:`state_dict` with the stage."""

    def __init__(self, regularizer: Regularizer, compressor: Compressor, model: nn.Module, *,
                 epochs: int, ramp: float) -> None:
        budget = compressor.budget
        # A measured latency is not timed every epoch: the MACs stand in for it while training.
        self.regularizer = regularizer
        self.budget = Budget("macs", budget.share) if budget.kind == "latency" else budget
        self.probe = zeros_only(compressor)
        self.input_shape = compressor.input_shape
        self.dense = self.budget.measure(model, self.input_shape)
        self.ramp_epochs = max(1, math.ceil(ramp * epochs))
        self.factor = 1.0
        self.trajectory: list[dict] = []

    def target(self, epochs_done: int) -> float:
        """The share of the dense cost that should remain after ``epochs_done`` epochs: at the
        end :data:`MARGIN` below the budget, so that compression has only zeros to remove."""
        final = self.budget.share * (1 - MARGIN)
        return 1 - (1 - final) * min(1.0, epochs_done / self.ramp_epochs)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> tuple[float, dict[str, dict]]:
        """The share of the dense cost that ``model`` costs with its exact zeros removed, and
        the compressor's report of that (per layer: rank, units kept)."""
        with quiet(logging.getLogger("compaware.compress")):  # its notes are for the final run
            compressed, report = self.probe(model)
        return self.budget.measure(compressed, self.input_shape) / self.dense, report

    @torch.no_grad()
    def predict(self, model: nn.Module, factor: float, step_size: float) -> float:
        """The share that would remain after a prox at ``factor`` over ``step_size`` (a whole
        epoch's), applied to a copy of ``model`` now."""
        copy_ = copy.deepcopy(model)
        held = self.regularizer.steering
        self.regularizer.steering = factor
        try:
            self.regularizer.prox(copy_, step_size)
        finally:
            self.regularizer.steering = held
        return self.measure(copy_)[0]

    def brake(self, model: nn.Module, factor: float, remaining: float, *, goal: float,
              step_size: float) -> float:
        """``factor``, or less where rising to it from the present factor would take the
        structure (now ``remaining``) below ``goal`` within one epoch: the largest factor
        between the two, found by bisection, that would not (possibly the present one).

        A prox applied to weights that a prox at the present strength has just thresholded
        removes more than the next epoch will, whose gradient steps regrow part of it; so the
        prediction at a factor is scaled by remaining / the prediction at the present one,
        which divides that bias out and leaves what the rise itself changes."""
        if factor <= self.factor:
            return factor
        present = self.predict(model, self.factor, step_size)
        if present == 0:  # nothing to scale by: no rise
            return self.factor

        def keeps_goal(candidate: float) -> bool:
            return remaining * self.predict(model, candidate, step_size) / present >= goal

        if keeps_goal(factor):
            return factor
        low, high = self.factor, factor
        for _ in range(BISECTIONS):
            middle = (low + high) / 2
            low, high = (middle, high) if keeps_goal(middle) else (low, middle)
        return low

    def epoch_step(self, lr: float, steps: int) -> float:
        """The step size of one epoch's prox: the regularizer's own rule where it proxes once
        an epoch (``prox_step``), the sum of its steps where it proxes at every step."""
        if self.regularizer.every == "epoch":
            return self.regularizer.prox_step(lr, steps)
        return lr * steps

    def after_epoch(self, model: nn.Module, epoch: int, writer: SummaryWriter, step: int, *,
                    next_lr: float, steps: int) -> None:
        """Measure the structure after ``epoch`` (from 0), log it against the target, and set
        the strength for the next epoch (of ``steps`` steps at ``next_lr``)."""
        remaining, report = self.measure(model)
        target, goal = self.target(epoch + 1), self.target(epoch + 2)
        lam = self.regularizer.lam * self.factor
        # where the structure is heading: a prox keeps removing for epochs after a rise
        last = self.trajectory[-1]["remaining"] if self.trajectory else 1.0
        heading = min(max(2 * remaining - last, remaining / MAX_STEP), 1.0)
        factor = min(max(self.factor * min(max((heading / goal) ** GAIN, 1 / MAX_STEP),
                                           MAX_STEP), BOUNDS[0]), BOUNDS[1])
        if remaining > goal:  # on the way down: no cliff below the next target
            factor = self.brake(model, factor, remaining, goal=goal,
                                step_size=self.epoch_step(next_lr, steps))
        self.factor = factor
        self.regularizer.steering = self.factor
        self.trajectory.append({"epoch": epoch + 1, "target": round(target, 4),
                                "remaining": round(remaining, 4), "lam": lam})
        kind = self.budget.kind
        writer.add_scalar(f"steer/{kind}_remaining", remaining, step)
        writer.add_scalar(f"steer/{kind}_target", target, step)
        writer.add_scalar("steer/lam", lam, step)
        for name, entry in report.items():
            for key, tag in (("rank", "rank"), ("kept", "units")):
                if key in entry:
                    writer.add_scalar(f"steer/{tag}/{name}", entry[key], step)
        log.info("steering toward %s:%g: %.4f of the dense %s remain after epoch %d "
                 "(target %.4f) at lam %.4g; next lam %.4g", kind, self.budget.share,
                 remaining, kind, epoch + 1, target, lam, self.regularizer.lam * self.factor)

    def summary(self) -> dict:
        """results.json's ``steering``: the budget, the trajectory (per epoch: target,
        remaining share, the lam in force) and whether training alone reached the budget."""
        last = self.trajectory[-1]["remaining"] if self.trajectory else 1.0
        return {"kind": self.budget.kind, "share": self.budget.share,
                "ramp_epochs": self.ramp_epochs, "remaining": last,
                "reached": last <= self.budget.share * (1 + TOLERANCE),
                "trajectory": self.trajectory}

    def state_dict(self) -> dict:
        return {"factor": self.factor, "trajectory": copy.deepcopy(self.trajectory)}

    def load_state_dict(self, state: dict) -> None:
        self.factor = state["factor"]
        self.trajectory = copy.deepcopy(state["trajectory"])
        self.regularizer.steering = self.factor


def steering_for(regularizer: Regularizer, compressor: Compressor, model: nn.Module, *,
                 epochs: int, ramp: float, enabled: bool = True) -> Steering | None:
    """The controller for a run, or None where there is nothing to steer; the log says why
    once when a budget is set and the strength is not steered."""
    budget: Budget | None = getattr(compressor, "budget", None)
    if budget is None or not epochs:
        return None
    spec = f"compress.target={budget.kind}:{budget.share:g}"
    name = type(regularizer).__name__
    common = set(regularizer.leaves) & set(compressor.removes)
    why = ("schedule.steer=false" if not enabled else
           f"{name} leaves no structure exactly zero" if not regularizer.leaves else
           f"{name} leaves {' and '.join(regularizer.leaves)} at zero, which "
           f"{type(compressor).__name__} does not remove" if not common else
           "regularizer.lam=0" if regularizer.lam == 0 else None)
    if why:
        log.info("%s: the regularizer's strength is not steered toward the budget (%s); it "
                 "trains at regularizer.lam and compression alone meets the budget.", spec, why)
        return None
    return Steering(regularizer, compressor, model, epochs=epochs, ramp=ramp)
