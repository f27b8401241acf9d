"""SSL's per-step passes over the weights by the C kernel ``group_sums.c``, with
``native_kernels=true``: the row and column sums of squares of each weight, and the
subgradient that scales each weight by a row factor plus a column factor
(:func:`compaware.regularizers.ssl.square_sums` and ``add_subgradients``, whose torch code
computes whatever the kernel does not take).

The kernel makes each of the two one pass in memory order; torch's operators make several
(column sums are a reduction along the outer axis, and the broadcast factor is written out
first). On ResNet-50's 23.5 M weights, 1 thread: the sums' pass 15 ms, the whole penalty
28–38 ms a step (94 ms with torch's operators), the subgradient 20–26 ms (36 ms). Each
function takes all the weights at once, so that the kernel's threads (torch's, through
OpenMP) share them. It takes contiguous float32 weights on the CPU, not a GPU's or a
channels-last one.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from compaware import native

SOURCE = Path(__file__).with_name("group_sums.c")


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """``group_sums.c``, built and loaded once per process; None, with a warning saying why,
    where it cannot be built."""
    pointer = ctypes.c_void_p
    return native.load_or_warn(
        SOURCE, "SSL's group norms run on torch's operators (same results, slower); set "
        "native_kernels=false to skip the attempt.",
        {"square_sums_each": [ctypes.c_int] + [pointer] * 7,
         "add_subgradient_each": [ctypes.c_int] + [pointer] * 6})


def _fits(*tensors: Tensor) -> bool:
    """Whether the kernel can take ``tensors``: contiguous float32 on the CPU."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in tensors)


def _for_the_kernel(tensors: list[tuple[Tensor, ...]]) -> list[int]:
    """The indices of the ``tensors`` tuples the kernel can take, largest weight first (the
    order its threads take them in), none if the kernel cannot be built."""
    fitting = [i for i, ts in enumerate(tensors) if _fits(*ts)]
    if not fitting or _kernel() is None:
        return []
    return sorted(fitting, key=lambda i: -tensors[i][0].numel())


def _shapes(tensors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Each tensor's rows (first axis) and columns (the others), as the kernel's arrays."""
    rows = [t.shape[0] for t in tensors]
    columns = [t.numel() // n for t, n in zip(tensors, rows, strict=True)]
    return torch.tensor(rows), torch.tensor(columns)


def square_sums(tensors: list[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
    """For each (detached) t of ``tensors`` the kernel takes, by its index: Σ t² over every
    axis but the first (one per row) and over the first (one per column, flat). All in one
    call, its threads sharing them."""
    chosen = _for_the_kernel([(t,) for t in tensors])
    if not chosen:
        return {}
    ts = [tensors[i] for i in chosen]
    n_rows, n_cols = _shapes(ts)
    rows = [t.new_empty(n) for t, n in zip(ts, n_rows.tolist(), strict=True)]
    columns = [t.new_empty(n) for t, n in zip(ts, n_cols.tolist(), strict=True)]
    scratch = torch.empty(int(n_cols.sum()))
    total = torch.empty(int(n_cols.sum()), dtype=torch.float64)
    at_w, at_rows, at_columns = (native.addresses(x) for x in (ts, rows, columns))
    _kernel().square_sums_each(len(ts), at_w.data_ptr(), n_rows.data_ptr(), n_cols.data_ptr(),
                               at_rows.data_ptr(), at_columns.data_ptr(), scratch.data_ptr(),
                               total.data_ptr())
    return {i: (r, c) for i, r, c in zip(chosen, rows, columns, strict=True)}


def add_subgradients(terms: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> set[int]:
    """For each (t, grad, rows, columns) of ``terms`` the kernel takes: grad += t · (rows[i]
    + columns[j...]) for each element t[i, j...]. All in one call, its threads sharing them;
    returns the indices of the terms it took."""
    chosen = _for_the_kernel(terms)
    if not chosen:
        return set()
    ts, grads, rows, columns = zip(*(terms[i] for i in chosen), strict=True)
    n_rows, n_cols = _shapes(list(ts))
    at_w, at_grads, at_rows, at_columns = (native.addresses(x)
                                           for x in (ts, grads, rows, columns))
    _kernel().add_subgradient_each(len(ts), at_w.data_ptr(), at_grads.data_ptr(),
                                   n_rows.data_ptr(), n_cols.data_ptr(), at_rows.data_ptr(),
                                   at_columns.data_ptr())
    return set(chosen)
