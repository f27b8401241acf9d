"""Modules whose channels Torch-Pruning cannot follow, traced as one opaque node.

Torch-Pruning follows channel indices through every op between two layers; where an op
mixes channels in a way its index mappings do not describe, the search for a group does not
end. Two kinds of module do this:

- a module that uses its layers' weights without calling the layers. torchvision's Swin
  attention (``ShiftedWindowAttention``) passes ``self.qkv.weight`` to a function that
  applies it between window partitions, rolls and head reshapes; Torch-Pruning sees bare
  weights and its index lists grow by the product of the flattened sizes at each reshape,
  so the first group of Swin-T (the residual stream) had not been built after 13 minutes.
- attention: a module that multiplies two of its activations (queries by keys, weights by
  values) after splitting its layers' channels into heads. In MaxViT's
  ``RelativePositionalMultiHeadAttention`` Torch-Pruning maps each head split (and the
  ``chunk`` into q, k and v) as if it flattened channels, by 32 and by 3; the index lists of
  the ``to_qkv`` group go round the attention's reshapes and einsums at 16 000 to 50 000
  indices, each round a few longer, so they never repeat: the group was not built after a
  minute, nor ever in a run (on a toy model the mapping names units beyond a layer's width).

Such a module is traced as one node (:func:`opaque_graph`): its output is attached to its
inputs by a single autograd node, so nothing inside it is traced (registering it as a
customized layer alone is not enough: Torch-Pruning still follows the ops inside, and
MaxViT's first group was still not built after 5 minutes), and the same :class:`Opaque`
function prunes its inputs and outputs, which ties them and keeps every group through it
whole (it holds parameters: :func:`compaware.compress.prune.blocking_layer`). MaxViT-T's
groups (at 221 pixels) are then all found in about 2 seconds, Swin-T's in under one.
Torch-Pruning's own pruners (``nn.MultiheadAttention``) are left to it, and so is the model
as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from compaware.layers import WEIGHT_LAYERS

# Products of two tensors over a shared dimension: between two activations, attention.
PRODUCTS = frozenset({torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__,
                      torch.bmm, Tensor.bmm, torch.baddbmm, torch.einsum,
                      nn.functional.scaled_dot_product_attention})


class Opaque(tp.pruner.function.BasePruningFunc):
    """A module Torch-Pruning sees as one node whose inputs and outputs are tied (the same
    function prunes both), and never changes: the groups through it are left whole."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


class _ProductsOfActivations(TorchFunctionMode):
    """Records, during a forward pass, the innermost running module (the last of
    ``running``) wherever two activations are multiplied: two operands of a product that are
    not ``constants`` (the storage of the model's parameters and buffers)."""

    def __init__(self, running: list[nn.Module], constants: set[int]) -> None:
        super().__init__()
        self.running, self.constants = running, constants
        self.users: list[nn.Module] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS and self.running:
            given = [a for arg in (*args, *kwargs.values())  # einsum takes a list too
                     for a in (arg if isinstance(arg, (list, tuple)) else (arg,))]
            activations = [a for a in given if isinstance(a, Tensor)
                           and a.untyped_storage().data_ptr() not in self.constants]
            if len(activations) >= 2:
                self.users.append(self.running[-1])
        return func(*args, **kwargs)


def opaque_pruners(model: nn.Module, example: Tensor) -> dict[type, Opaque]:
    """``customized_pruners`` for Torch-Pruning's ``build_dependency``: an :class:`Opaque`
    for the type of each module of ``model`` that, on ``example``, uses a conv or linear
    inside it without calling it, or multiplies two activations (for a module without a conv
    or linear of its own: the nearest enclosing one with some)."""
    called: set[nn.Module] = set()
    running: list[nn.Module] = []

    def enter(module, args):
        running.append(module)

    def leave(module, args, out):
        running.pop()
        called.add(module)

    hooks = [hook for module in model.modules()
             for hook in (module.register_forward_pre_hook(enter),
                          module.register_forward_hook(leave))]
    products = _ProductsOfActivations(running, {
        t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())})
    try:
        with torch.no_grad(), products:
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    parent = {child: module for module in model.modules() for child in module.children()}
    users = products.users + [parent.get(layer) for layer in model.modules()
                              if isinstance(layer, WEIGHT_LAYERS) and layer not in called]
    known = tuple(tp.ops.type2class(kind) for kind in tp.pruner.function.PrunerBox
                  if tp.ops.type2class(kind) is not None)
    opaque: dict[type, Opaque] = {}
    for user in users:
        while user is not None and (user not in called or not _holds_layers(user)):
            user = parent.get(user)
        if user is not None and user is not model and not isinstance(user, known):
            opaque[type(user)] = Opaque()
    return opaque


def _holds_layers(module: nn.Module) -> bool:
    return any(isinstance(m, WEIGHT_LAYERS) for m in module.modules())


class _OneNode(torch.autograd.Function):
    """The output of an opaque module, attached to its inputs by this one node only (it is
    for tracing: no gradient flows through it)."""

    @staticmethod
    def forward(ctx, out: Tensor, *inputs: Tensor) -> Tensor:
        ctx.inputs = len(inputs)
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None,) * (1 + ctx.inputs)


def _as_one_node(module: nn.Module, args: tuple, out):
    inputs = [a for a in args if isinstance(a, Tensor)]
    if isinstance(out, Tensor) and any(a.requires_grad for a in inputs):
        return _OneNode.apply(out.detach(), *inputs)
    return None  # nothing to attach to: traced as Torch-Pruning does


@contextmanager
def _traced_as_one_node(model: nn.Module, kinds: tuple[type, ...]) -> Iterator[None]:
    hooks = [module.register_forward_hook(_as_one_node) for module in model.modules()
             if isinstance(module, kinds) and module is not model]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def opaque_graph(model: nn.Module, example: Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` traced on ``example`` (with autograd on),
    each module of :func:`opaque_pruners` one node. Our hooks are registered before
    Torch-Pruning's, so it records the one node as the module's output."""
    pruners = opaque_pruners(model, example)
    with _traced_as_one_node(model, tuple(pruners)):
        return tp.DependencyGraph().build_dependency(model, example, verbose=False,
                                                     customized_pruners=pruners)
