"""The one interface every regularizer implements, with no-op defaults.

Where each hook runs (see ``compaware/loop.py``)::

    regularizer.setup(model, data_info)                   # start of the stage, before the
                                                          # optimizer is built
    loss = cross_entropy + regularizer.penalty(model)    # every step, differentiable (or
                                                          # its gradient added after backward)
    loss.backward()
    regularizer.after_backward(model)                     # every step: may edit the gradients
    optimizer.step()
    regularizer.prox(model, step)                         # after the step if every=step,
                                                          # at the end of the epoch if every=epoch
                                                          # (step: from lr, see prox_step)
    regularizer.stats(model)                              # end of epoch, logged to TensorBoard
    regularizer.figures(model)                            # end of epoch, TensorBoard images
    regularizer.artifacts(model)                          # after training: what it learned,
                                                          # handed to the compressor

``prox`` mutates the parameters in place under ``no_grad`` and ``after_backward`` their
gradients; nothing else touches the model.

The strength ``lam`` has one meaning for every method: the objective is the mean
cross-entropy per sample + lam · r(θ). SGD on it takes a step of lr · lam · ∇r, proximal SGD
a prox of lr · lam · r after each step, and a prox once per epoch one of (lr × the epoch's
steps) · lam · r, the same threshold summed. None of these depends on the dataset's size or
the steps per epoch. ``ramp`` scales the strength in force (the loop's warm-up,
``schedule.strength_ramp``, times the factor by which training toward a budget steers it,
compaware/steering.py): every penalty, subgradient and prox threshold is multiplied by it.

A regularizer with learnable state (soft weight-sharing) creates it in ``setup`` (from the
weights it starts from and the data), returns it from ``state_dict`` and its parameters from
``param_groups``, so it is optimised and checkpointed with the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from compaware.config import UserError, check_choice, check_range
from compaware.layers import LayerSelection

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from compaware.data import DataInfo

EVERY = ("epoch", "step")
PROX_STEPS = ("lr", "lr_x_steps")


class Regularizer:
    """No penalty, no prox: plain training (``regularizer=none``).

    ``lam`` is the strength; ``layers``/``skip_first``/``skip_last`` choose the layers
    (:class:`compaware.layers.LayerSelection`).
    """

    every: str | None = None  # when prox runs: "epoch", "step", or never
    warmup: float = 1.0  # the warm-up's share of the strength (schedule.strength_ramp)
    steering: float = 1.0  # the budget controller's factor on lam (compaware/steering.py)
    # The structure its prox leaves exactly zero for a compressor to remove: "rank" (singular
    # values), "units" (whole output units or input channels). What steering can measure.
    leaves: tuple[str, ...] = ()
    needs_pretrained = False  # a method that retrains a trained network (warned about otherwise)
    publishes: tuple[str, ...] = ()  # the keys of artifacts(): what a compressor may require

    def __init__(self, lam: float = 0.0, layers: str = "all", skip_first: bool = False,
                 skip_last: bool = False) -> None:
        check_range("regularizer.lam", lam, 0)
        self.lam = float(lam)
        self.select = LayerSelection("regularizer", layers, skip_first, skip_last)

    @property
    def ramp(self) -> float:
        """The share of ``lam`` in force, by which every penalty, subgradient and prox
        threshold is multiplied: the warm-up's share, which the loop sets before each step,
        times the steering factor toward a budget (1 without one)."""
        return self.warmup * self.steering

    @ramp.setter
    def ramp(self, share: float) -> None:
        self.warmup = share

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The layers this regularizer acts on in ``model``."""
        return self.select(model)

    def check(self, model: nn.Module) -> None:
        """Called once before its stage trains: stop with a clear message when there is
        nothing in ``model`` to act on (a plain, zero-strength regularizer never stops)."""
        if self.lam > 0 and not self.layers(model):
            s = self.select
            raise UserError(
                f"regularizer {type(self).__name__} selects no layer of {type(model).__name__}: "
                f"regularizer.layers={s.kind}, skip_first={s.skip_first}, "
                f"skip_last={s.skip_last} leave no conv or linear layer it can act on. "
                f"regularizer.layers takes one of: all, conv, linear.")

    def setup(self, model: nn.Module, data: DataInfo) -> None:
        """Called at the start of each stage, before the optimizer is built: create state that
        depends on the starting weights or on the data (nothing here)."""

    def penalty(self, model: nn.Module) -> Tensor:
        """Term added to the loss at every step (zero here): differentiable, or a value whose
        gradient ``after_backward`` adds itself (SSL's, for speed)."""
        return torch.zeros((), device=next(model.parameters()).device)

    def after_backward(self, model: nn.Module) -> None:
        """Called between ``backward`` and the optimizer step, e.g. to constrain the
        gradients (nothing here)."""

    def prox(self, model: nn.Module, step: float) -> None:
        """Proximal operator with step size ``step``, applied in place (nothing here)."""

    def prox_step(self, lr: float, steps: int) -> float:
        """The step size of the prox after ``steps`` SGD steps at learning rate ``lr``."""
        return lr * steps

    def stats(self, model: nn.Module) -> dict[str, float]:
        """Scalars to log at the end of each epoch (``reg/<key>``)."""
        return {}

    def figures(self, model: nn.Module) -> dict[str, Figure]:
        """Matplotlib figures to log at the end of each epoch (``reg/<key>`` images)."""
        return {}

    def artifacts(self, model: nn.Module) -> dict:
        """What training learned besides the weights, for the compressor (the keys of
        ``publishes``; soft weight-sharing's mixture). Nothing here."""
        return {}

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Extra optimizer parameter groups for learnable regularizer state."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ProximalRegularizer(Regularizer):
    """A regularizer optimised by proximal steps, at ``every: epoch|step``.

    ``prox_step`` chooses the step size t of the prox: ``lr_x_steps`` (t = lr × the SGD steps
    since the last prox: a per-epoch prox shrinks as much as per-step proxes would over the
    epoch, so lam is the strength of the objective above) or ``lr`` (t = the current learning
    rate whatever the steps: the literal reading of the papers' once-per-epoch prox, kept for
    their experiments' λ; its effect grows or shrinks with the steps per epoch). With
    ``every: step`` both are t = lr.
    """

    def __init__(self, lam: float, every: str = "epoch", prox_step: str = "lr_x_steps",
                 layers: str = "all", skip_first: bool = False, skip_last: bool = False) -> None:
        super().__init__(lam, layers, skip_first, skip_last)
        check_choice("regularizer.every", every, EVERY)
        check_choice("regularizer.prox_step", prox_step, PROX_STEPS)
        self.every, self.prox_step_rule = every, prox_step

    def prox_step(self, lr: float, steps: int) -> float:
        return lr * steps if self.prox_step_rule == "lr_x_steps" else lr
