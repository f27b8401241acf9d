"""BatchNorm folding for inference: a conv (or linear) followed by a BatchNorm becomes one layer.

In eval mode a BatchNorm is an affine map per channel, y = γ·(x − μ)/√(σ² + ε) + β, so the
layer before it can absorb it: W' = W·γ/√(σ² + ε) per output channel, b' = (b − μ)·γ/√(σ² + ε)
+ β. The folded network computes the same function (up to rounding) with one pass over the
activations fewer per BatchNorm, which is what a deployed model runs
(``torch.nn.utils.fusion`` does the arithmetic). Only exclusive pairs are folded: the
BatchNorm must be the sole reader of the layer's output (``layers.batchnorm_pairs``).

The benchmark folds the dense and the compressed model alike before timing and exporting
them, so their latencies compare what each would cost in production.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from compaware.layers import batchnorm_pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every foldable BatchNorm folded into the layer
    before it (and replaced by ``nn.Identity``); returns it and how many were folded."""
    folded = copy.deepcopy(model).eval()
    pairs = batchnorm_pairs(folded, exclusive=True)
    for layer_name, norm_name in pairs:
        layer, norm = folded.get_submodule(layer_name), folded.get_submodule(norm_name)
        if hasattr(layer, "fold_batchnorm"):  # a compressed layer (compress/shape.py)
            layer = layer.fold_batchnorm(norm)
        else:
            fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
            layer = fuse(layer, norm)
        folded.set_submodule(layer_name, layer)
        folded.set_submodule(norm_name, nn.Identity())
    return folded, len(pairs)
