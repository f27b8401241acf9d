"""What a model costs in its structure: parameters and the multiply-accumulates of one
forward pass. One definition for the benchmark (compaware/deploy/bench.py, results.json's
``params`` and ``macs``) and for compression to a budget (compaware/compress/budget.py).

MACs come from ``torch.utils.flop_counter`` (FLOPs / 2: it counts 2 per multiply-accumulate
of convs, linears and matmuls). The counter reads shapes, not values: zeroed weights cost the
same until the layer is physically smaller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from compaware.layers import eval_mode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None,
                     **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # QKᵀ and attention × V


# CPU's fused attention kernel, missing from FlopCounterMode's formulas (which have the
# CUDA ones): counted as the CUDA kernels are.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


@contextlib.contextmanager
def attention_fastpath_disabled() -> Iterator[None]:
    """``nn.MultiheadAttention`` (and the transformer layers) without their inference fast
    path for the block: that path runs one fused op the flop counter does not know (counted
    as 0), where the ordinary path runs the projections and attention the counter sees."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single input of ``input_shape`` (C, H, W):
    convolutions and matrix products, attention's included (not the normalisations,
    activations or softmax)."""
    param = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    with (eval_mode(model), attention_fastpath_disabled(),
          FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter):
        model(x)
    return counter.get_total_flops() // 2
