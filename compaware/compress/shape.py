"""Shape-wise removal: a layer whose weight has all-zero columns computes only the live ones.

A conv is a GEMM on its im2col matrix: W (N, C·kh·kw) times the unfolded input
(C·kh·kw, L), L output positions. A zero column c·kh·kw + h·kw + w of W (SSL's shape-wise
group W[:, c, h, w]) multiplies one row of the unfolded input by zero, so that row need
not be formed nor multiplied: :class:`LiveColumnConv2d` unfolds the input, keeps the live
rows and does one GEMM of N × k by k × L (k live columns), exactly the conv's output for
N·k·L MACs instead of N·C·kh·kw·L. A linear layer's columns are its inputs:
:class:`LiveInputLinear` gathers the live inputs and multiplies by the N × k weight.

Both are made of standard modules (``nn.Unfold``, ``nn.Linear``) plus an index buffer, so
``torch.utils.flop_counter`` sees the GEMM (the unfold and the gather are copies, not
MACs) and ``torch.export`` writes them as ordinary graphs.

:func:`drop_dead_columns` replaces, in place, every given layer that has dead columns.
Filter-wise rows and whole channels are the prune compressor's job (they change the
neighbouring layers too); run it before this, so only the remaining dead columns are left.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from compaware.compress.base import Report


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out × k) and ``bias``."""
    with warnings.catch_warnings():  # k = 0 (no live column) is fine: the output is the bias
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class LiveColumnConv2d(nn.Module):
    """``conv`` computing only the im2col columns in ``live`` (indices into C·kh·kw)."""

    def __init__(self, conv: nn.Conv2d, live: Tensor) -> None:
        super().__init__()
        w = conv.weight
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.unfold = nn.Unfold(conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        self.register_buffer("live", live.to(device=w.device, dtype=torch.long))
        self.gemm = _linear(w.flatten(1)[:, self.live], conv.bias)

    def _out_size(self, size: int, axis: int) -> int:
        span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
        return (size + 2 * self.padding[axis] - span) // self.stride[axis] + 1

    def forward(self, x: Tensor) -> Tensor:
        height, width = self._out_size(x.shape[-2], 0), self._out_size(x.shape[-1], 1)
        columns = self.unfold(x).index_select(1, self.live)  # (B, k, L)
        out = self.gemm(columns.transpose(1, 2))  # (B, L, N): one GEMM
        return out.transpose(1, 2).reshape(x.shape[0], -1, height, width)


class LiveInputLinear(nn.Module):
    """``linear`` reading only the inputs in ``live``."""

    def __init__(self, linear: nn.Linear, live: Tensor) -> None:
        super().__init__()
        w = linear.weight
        self.register_buffer("live", live.to(device=w.device, dtype=torch.long))
        self.linear = _linear(w[:, self.live], linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.index_select(-1, self.live))


def live_columns(weight: Tensor, threshold: float = 0.0) -> Tensor:
    """Indices of the columns of ``weight`` (out × rest, flattened) with some |w| > threshold."""
    return (weight.detach().flatten(1).abs() > threshold).any(0).nonzero().flatten()


def unsupported(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be replaced, or ``None``."""
    if isinstance(layer, nn.Linear):
        return None
    if not isinstance(layer, nn.Conv2d):
        return f"{type(layer).__name__} (only Conv2d and Linear)"
    if layer.groups > 1:
        return "grouped conv"
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return "padding other than explicit zeros"
    return None


@torch.no_grad()
def drop_dead_columns(model: nn.Module, layers: list[tuple[str, nn.Module]],
                      threshold: float = 0.0) -> Report:
    """Replace, in ``model``, each of ``layers`` (qualified name, module) that has columns
    with every |w| ≤ ``threshold`` (0: exact zeros, outputs unchanged) by its live-column
    version. Returns per layer: ``columns``, ``live_columns``, ``replaced`` (and ``reason``
    where a layer type is not supported)."""
    report: Report = {}
    for name, layer in layers:
        reason = unsupported(layer)
        if reason:
            report[name] = {"replaced": False, "reason": reason}
            continue
        live = live_columns(layer.weight, threshold)
        columns = layer.weight[0].numel()
        report[name] = {"columns": columns, "live_columns": len(live),
                        "replaced": len(live) < columns}
        if len(live) < columns:
            smaller = (LiveInputLinear if isinstance(layer, nn.Linear) else LiveColumnConv2d)
            model.set_submodule(name, smaller(layer, live))
    return report
