"""The per-step passes of SSL's group lasso over the weights, in C where it can be built.

A weight is seen as a matrix, its first axis the rows (filters, output units), the others
the columns (input channel × kernel position, input units); every group norm of
``compaware/regularizers/ssl.py`` is a sum of its row sums or of its column sums of
squares, and the subgradient scales each weight by a row factor plus a column factor. The
C kernel (``group_sums.c``, built by ``compaware/native.py``) makes each of the two one pass
in memory order; torch's operators make several (column sums are a reduction along the outer
axis, and the broadcast factor is written out first). On ResNet-50's 23.5 M weights, 1
thread: the sums' pass 15 ms, the whole penalty 28–38 ms a step (94 ms with torch's
operators), the subgradient 20–26 ms (36 ms). Float32 weights on the CPU use the kernel,
the rest (a GPU's) the torch code, with equal results.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

from compaware import native

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("group_sums.c")


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """``group_sums.c``, built and loaded once per process; None, with a warning saying why,
    where it cannot be built."""
    try:
        library = native.load(SOURCE)
    except native.NativeUnavailable as e:
        log.warning("SSL's C kernel is unavailable here (%s); its group norms run on torch's "
                    "operators (same results, slower).", e)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_long
    library.square_sums.argtypes = [pointer, size, size, pointer, pointer, pointer, pointer]
    library.add_subgradient.argtypes = [pointer, pointer, size, size, pointer, pointer]
    return library


def _native(*tensors: Tensor) -> ctypes.CDLL | None:
    """The kernel, if it can run on ``tensors`` (contiguous float32 on the CPU)."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
           for t in tensors):
        return _kernel()
    return None


def square_sums(t: Tensor) -> tuple[Tensor, Tensor]:
    """Σ t² over every axis but the first (shape ``t.shape[:1]``) and over the first (shape
    ``t.shape[1:]``); a 1-D ``t`` is a column: its squares and their total."""
    t = t.detach()
    matrix = t.reshape(t.shape[0], -1)
    kernel = _native(t)
    if kernel is None:
        rows = torch.linalg.vector_norm(matrix, dim=1).square()
        columns = torch.linalg.vecdot(matrix.T, matrix.T)
    else:
        rows, columns = t.new_empty(matrix.shape[0]), t.new_empty(matrix.shape[1])
        scratch = t.new_empty(matrix.shape[1])
        total = torch.empty(matrix.shape[1], dtype=torch.float64)
        kernel.square_sums(t.data_ptr(), *matrix.shape, rows.data_ptr(), columns.data_ptr(),
                           scratch.data_ptr(), total.data_ptr())
    return rows.reshape(t.shape[:1]), columns.reshape(t.shape[1:])


def add_subgradient(t: Tensor, rows: Tensor, columns: Tensor) -> None:
    """``t.grad`` += t · (rows[i] + columns[j...]) for each element t[i, j...]: ``rows`` of
    shape ``t.shape[:1]``, ``columns`` of shape ``t.shape[1:]`` (a scalar for a 1-D t)."""
    if t.grad is None:
        t.grad = torch.zeros_like(t)
    t, grad = t.detach(), t.grad
    kernel = _native(t, grad, rows, columns)
    if kernel is None:
        grad.addcmul_(t, rows.reshape(rows.shape + (1,) * (t.dim() - 1)) + columns)
    else:
        kernel.add_subgradient(t.data_ptr(), grad.data_ptr(), len(rows), columns.numel(),
                               rows.data_ptr(), columns.data_ptr())
