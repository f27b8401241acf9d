"""Shape-wise removal: a layer whose weight has all-zero columns computes only the live ones.

A conv is a GEMM on its im2col matrix: W (N, C·kh·kw) times the unfolded input
(C·kh·kw, L), L output positions. A zero column c·kh·kw + h·kw + w of W (SSL's shape-wise
group W[:, c, h, w]) multiplies one row of the unfolded input by zero, so that row need
not be formed nor multiplied: :class:`LiveColumnConv2d` gathers the im2col rows of the
live columns only and does one GEMM of N × k by k × L (k live columns), exactly the conv's
output for N·k·L MACs instead of N·C·kh·kw·L. A linear layer's columns are its inputs:
:class:`LiveInputLinear` gathers the live inputs and multiplies by the N × k weight.

Both are an ``nn.Linear`` plus index buffers and standard tensor ops (pad, gather,
matmul), so ``torch.utils.flop_counter`` sees the GEMM (the gather is a copy, not MACs)
and ``torch.export`` writes them as ordinary graphs. Gathering only the live rows, rather
than unfolding every column and selecting, is what makes the smaller GEMM a faster layer
(``scripts/ssl_layers.py`` measures it against ``nn.Conv2d``).

:func:`drop_dead_columns` replaces, in place, every given layer that has dead columns.
Filter-wise rows and whole channels are the prune compressor's job (they change the
neighbouring layers too); run it before this, so only the remaining dead columns are left.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_linear_bn_eval

from compaware.compress.base import Report
from compaware.compress.latency import LatencyCheck


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
    """``conv`` computing only the im2col columns in ``live`` (indices into C·kh·kw).

    The forward forms the im2col matrix of the live rows alone, with one gather from the
    zero-padded input (live column (c, i, j) at output position (y, x) reads
    x_pad[c, y·stride + i·dilation, x·stride + j·dilation]), for the whole batch at once,
    then does one GEMM: W_live (N × k) · columns (k × L·B).
    ``gemm`` holds W_live and the bias as an ``nn.Linear``, so tools that list conv and
    linear layers (results.json ``structure``) see the smaller layer.
    """

    fx_leaf = True  # its forward computes shapes in Python: one call to torch.fx

    def __init__(self, conv: nn.Conv2d, live: Tensor) -> None:
        super().__init__()
        w = conv.weight
        kh, kw = conv.kernel_size
        self.stride, self.padding = conv.stride, conv.padding
        self.span = tuple(d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size,
                                                         strict=True))
        live = live.to(device=w.device, dtype=torch.long)
        # where each live column reads, relative to an output position's top-left corner
        self.register_buffer("channel", live // (kh * kw))
        self.register_buffer("row", live % (kh * kw) // kw * conv.dilation[0])
        self.register_buffer("col", live % kw * conv.dilation[1])
        self.gemm = _linear(w.flatten(1)[:, live], conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        (ph, pw), (sh, sw) = self.padding, self.stride
        x = F.pad(x, (pw, pw, ph, ph))
        batch, _, height, width = x.shape
        out_h = (height - self.span[0]) // sh + 1
        out_w = (width - self.span[1]) // sw + 1
        starts = self.channel * (height * width) + self.row * width + self.col  # (k,)
        rows = torch.arange(out_h, device=x.device) * (sh * width)
        positions = (rows[:, None] + torch.arange(out_w, device=x.device) * sw).flatten()
        index = (starts[:, None] + positions).flatten()  # (k · L,)
        pixels = x.flatten(1).t().contiguous()  # one row of `batch` values per input pixel
        columns = pixels.index_select(0, index).view(len(starts), len(positions) * batch)
        w, bias = self.gemm.weight, self.gemm.bias
        out = w @ columns if bias is None else torch.addmm(bias[:, None], w, columns)
        return out.view(len(w), len(positions), batch).permute(2, 0, 1).reshape(
            batch, len(w), out_h, out_w)

    def fold_batchnorm(self, norm: nn.Module) -> LiveColumnConv2d:
        """This layer with the eval-mode BatchNorm that reads its output folded in (its
        per-channel scale and shift go into the GEMM's rows and bias), as for a conv."""
        self.gemm = fuse_linear_bn_eval(self.gemm, norm)
        return self


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
                      threshold: float = 0.0, min_sparsity: float = 0.0,
                      check: LatencyCheck | None = None) -> Report:
    """Replace, in ``model``, each of ``layers`` (qualified name, module) that has columns
    with every |w| ≤ ``threshold`` (0: exact zeros, outputs unchanged) by its live-column
    version, where at least ``min_sparsity`` of its columns are dead (the gather costs time:
    a nearly dense layer is faster as it is) and, given a latency ``check``, where it times
    faster than the layer. Returns per layer: ``columns``, ``live_columns``, ``replaced``,
    ``latency_ms`` where timed, and a ``reason`` where it was not replaced."""
    report: Report = {}
    for name, layer in layers:
        reason = unsupported(layer)
        if reason:
            report[name] = {"replaced": False, "reason": reason}
            continue
        live = live_columns(layer.weight, threshold)
        columns = layer.weight[0].numel()
        dead = 1 - len(live) / columns
        report[name] = {"columns": columns, "live_columns": len(live),
                        "replaced": dead > 0 and dead >= min_sparsity}
        if report[name]["replaced"]:
            live_layer = (LiveInputLinear if isinstance(layer, nn.Linear)
                          else LiveColumnConv2d)(layer, live)
            if check is None or check.keeps(name, layer, live_layer, report[name], "replaced",
                                            "live_columns"):
                model.set_submodule(name, live_layer)
        elif dead > 0:
            report[name]["reason"] = f"{dead:.0%} of the columns dead, below min_sparsity"
    return report
