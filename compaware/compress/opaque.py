"""Modules that use their layers' weights without calling the layers, kept opaque to
Torch-Pruning.

torchvision's Swin attention (``ShiftedWindowAttention``) passes ``self.qkv.weight`` to a
function that applies it between window partitions, rolls and head reshapes. Torch-Pruning
then sees bare weights and follows channel indices through every reshape; its index lists
grow by the product of the flattened sizes at each one, so building the first group of
Swin-T (the residual stream) had not ended after 13 minutes. Traced as one node instead,
such a module ties its inputs to its outputs and keeps every group through it whole (it is
attention: :func:`compaware.compress.prune.blocking_layer`), and each group is found in
seconds. A module is opaque when, in one forward pass, a conv or linear inside it is never
called while the module is; Torch-Pruning's own pruners (``nn.MultiheadAttention``) are
left to it, and so is the model as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from compaware.layers import WEIGHT_LAYERS


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


def opaque_pruners(model: nn.Module, example: Tensor) -> dict[type, Opaque]:
    """``customized_pruners`` for Torch-Pruning's ``build_dependency``: an :class:`Opaque`
    for the type of each module of ``model`` that uses a conv or linear inside it without
    calling it on ``example``."""
    called: set[nn.Module] = set()
    hooks = [module.register_forward_hook(lambda module, args, out: called.add(module))
             for module in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    parent = {child: module for module in model.modules() for child in module.children()}
    known = tuple(tp.ops.type2class(kind) for kind in tp.pruner.function.PrunerBox
                  if tp.ops.type2class(kind) is not None)
    opaque: dict[type, Opaque] = {}
    for layer in model.modules():
        if not isinstance(layer, WEIGHT_LAYERS) or layer in called:
            continue
        user = parent.get(layer)
        while user is not None and user not in called:
            user = parent.get(user)
        if user is not None and user is not model and not isinstance(user, known):
            opaque[type(user)] = Opaque()
    return opaque
