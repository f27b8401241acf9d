"""Soft weight-sharing's mixture prior by the C kernel ``mixture.c``: the sums of
:func:`compaware.regularizers.sws.mixture_sums`, for float32 weights on the CPU, with
``native_kernels=true``.

Each tensor is cut into pieces, the unit torch's threads share (no concatenated copy: 0.1 s
a step for ResNet-50's 23.5 M weights); each piece is summed block by block of 32 weights
whose terms stay in L1. 2–3× faster than ``torch.compile``'s kernel on a CPU.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from compaware import native

SOURCE = Path(__file__).with_name("mixture.c")
# Weights per piece, the unit the kernel's threads share: small enough for LeNet-5's 431 k
# weights to spread over a few threads, large enough that handing out ResNet-50's 360 costs
# nothing next to their work. Fixed, so the sums do not depend on the thread count.
PIECE = 1 << 16


@functools.cache
def _kernel() -> ctypes._CFuncPtr | None:
    """``mixture_sums_pieces`` of ``mixture.c``, built and loaded once per process; None,
    with a warning saying why, where it cannot be built."""
    pointer = ctypes.c_void_p
    library = native.load_or_warn(
        SOURCE, "soft weight-sharing's prior runs on torch's kernel (same results, slower); "
        "set native_kernels=false to skip the attempt.",
        {"mixture_sums_pieces": [ctypes.c_int, pointer, pointer, ctypes.c_int, pointer,
                                 pointer, pointer, ctypes.c_float, pointer, pointer, pointer]})
    return library.mixture_sums_pieces if library is not None else None


def sums(weights: list[Tensor], means: Tensor, precisions: Tensor,
         log_norms: Tensor) -> tuple | None:
    """What :func:`compaware.regularizers.sws.mixture_sums` returns, by the C kernel; None
    where it does not take ``weights`` (not all float32 on the CPU: a GPU's) or cannot be
    built here, for the caller's torch kernel to compute instead."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in weights):
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    means, precisions, log_norms = (t.to(torch.float32).contiguous()
                                    for t in (means, precisions, log_norms))
    weights = [t.contiguous() for t in weights]
    grads = [torch.empty_like(t) for t in weights]
    pieces = [piece for w, g in zip(weights, grads, strict=True)
              for piece in zip(*(t.view(-1).split(PIECE) for t in (w, g)), strict=True)]
    w_pieces, grad_pieces = (native.addresses(column) for column in zip(*pieces, strict=True))
    sizes = torch.tensor([w.numel() for w, _ in pieces], dtype=torch.int64)
    log_totals = torch.empty(len(pieces), dtype=torch.float64)
    partial = torch.empty(len(pieces), 3, len(means), dtype=torch.float64)
    kernel(len(pieces), w_pieces.data_ptr(), sizes.data_ptr(), len(means), means.data_ptr(),
           precisions.data_ptr(), log_norms.data_ptr(), float(log_norms.max()),
           grad_pieces.data_ptr(), log_totals.data_ptr(), partial.data_ptr())
    return (weights[0].new_tensor(float(log_totals.sum())), grads,
            *partial.sum(0).to(means.dtype))
