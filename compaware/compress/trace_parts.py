"""Torch-Pruning's dependency graphs of a model, whole or part by part.

:func:`dependency_graph` traces the whole model. A model Torch-Pruning cannot trace as a
whole (ShuffleNet's channel shuffle) is pruned part by part (:func:`traced_parts`): inside
the largest submodules that trace alone, each between two 1×1 stand-ins for the rest of the
model (:class:`_Probed`), so that the channels on the part's boundary show up in its graph
and can be kept. A model no part of which traces stops with :class:`UntraceableModel`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import Tensor, nn

from compaware.compress.latency import input_shapes
from compaware.compress.opaque import opaque_graph
from compaware.config import UserError
from compaware.layers import WEIGHT_LAYERS, describe_failure, eval_mode

log = logging.getLogger(__name__)


@contextmanager
def example_in_eval_mode(model: nn.Module, input_shape: tuple[int, ...]):
    """One zero input of ``input_shape`` for ``model``, which is in eval mode meanwhile: a
    training-mode forward would move BatchNorm's running statistics."""
    param = next(model.parameters())
    with eval_mode(model):
        yield torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)


def dependency_graph(model: nn.Module, input_shape: tuple[int, ...]) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``model``, traced (with autograd on: Torch-Pruning follows
    autograd's graph) on one input of ``input_shape``; modules whose channels it cannot
    follow (attention, layers' weights used without calling them) are single nodes
    (compaware/compress/opaque.py)."""
    with example_in_eval_mode(model, input_shape) as example, torch.enable_grad():
        try:
            return opaque_graph(model, example)
        except Exception as e:  # a shape mismatch or an untraceable model, deep inside torch
            raise UntraceableModel(
                f"compress: Torch-Pruning could not trace {type(model).__name__} on an input of "
                f"shape {list(input_shape)} (compress.input_shape, taken from the data): "
                f"tracing {describe_failure(model, e)}") from None


class UntraceableModel(UserError):
    """Torch-Pruning cannot build the dependency graph of a model."""


def traced_parts(model: nn.Module, input_shape: tuple[int, ...]
                 ) -> list[tuple[tp.DependencyGraph, set[nn.Module]]]:
    """The dependency graphs to prune ``model`` through, as (graph, boundary) pairs.

    The whole model's graph when Torch-Pruning traces it (no boundary). Otherwise, from the
    top down, each submodule that traces on its own input (recorded in one forward pass),
    between two 1×1 stand-ins for the rest of the model: a group that reaches a stand-in
    (``boundary``) would change what the part takes or gives, and is left whole. The parts
    that do not trace are left whole, with a log line naming them.
    """
    try:
        return [(dependency_graph(model, input_shape), set())]
    except UntraceableModel as whole:
        try:
            shapes = input_shapes(model, input_shape, batch_size=1)
        except Exception:  # the model does not even run on this input
            raise whole from None
        param = next(model.parameters())
        parts: list[tuple[tp.DependencyGraph, set[nn.Module]]] = []
        untraced: list[str] = []

        def visit(prefix: str, module: nn.Module) -> None:
            for name, child in module.named_children():
                where = f"{prefix}{name}"
                example = (torch.zeros(shapes[where], device=param.device, dtype=param.dtype)
                           if where in shapes else None)
                try:  # the part's own forward may fail too (several inputs, say)
                    probed = _Probed.around(child, example)
                    with torch.enable_grad():
                        graph = probed and opaque_graph(probed, example)
                except Exception:  # as in dependency_graph: deep inside torch
                    graph = None
                if graph:
                    parts.append((graph, {probed.enter, probed.leave}))
                elif any(isinstance(m, WEIGHT_LAYERS) for m in child.modules()):
                    untraced.append(where)
                    visit(f"{where}.", child)

        with eval_mode(model):
            visit("", model)
        if not parts:
            tried = ", ".join(untraced[:8]) + (", …" if len(untraced) > 8 else "")
            raise UntraceableModel(f"{whole} No part of it traces alone either (tried: {tried}); "
                                   f"use compress=svd, or make those layers traceable.") from None
        log.info("prune: Torch-Pruning cannot trace %s as a whole; pruning inside %d parts "
                 "that trace alone, their boundary channels kept (not traced: %s)",
                 type(model).__name__, len(parts), ", ".join(untraced))
        return parts


class _Probed(nn.Module):
    """A part of a model between two 1×1 layers (``enter``, ``leave``) standing for the rest
    of the model, so that its boundary channels show up in the part's dependency graph."""

    def __init__(self, part: nn.Module, enter: nn.Module, leave: nn.Module) -> None:
        super().__init__()
        self.enter, self.part, self.leave = enter, part, leave

    def forward(self, x: Tensor) -> Tensor:
        return self.leave(self.part(self.enter(x)))

    @classmethod
    def around(cls, part: nn.Module, example: Tensor | None) -> _Probed | None:
        """``part`` probed for ``example`` (N, C, …), or None where its input or output is not
        one tensor of 2 or 4 dimensions."""
        if example is None or example.dim() not in (2, 4):
            return None
        with torch.no_grad():
            out = part(example)
        if not isinstance(out, Tensor) or out.dim() not in (2, 4):
            return None
        return cls(part, _one_by_one(example), _one_by_one(out))


def _one_by_one(x: Tensor) -> nn.Module:
    channels = x.shape[1]
    layer = nn.Linear(channels, channels) if x.dim() == 2 else nn.Conv2d(channels, channels, 1)
    return layer.to(x.device, x.dtype)
