"""Shape-wise removal: a layer whose weight has all-zero columns computes only the live ones.

A conv is a GEMM on its im2col matrix: W (N, C·kh·kw) times the unfolded input
(C·kh·kw, L), L output positions. A zero column c·kh·kw + h·kw + w of W (SSL's shape-wise
group W[:, c, h, w]) multiplies one row of the unfolded input by zero, so that row need
not be formed nor multiplied: :class:`LiveColumnConv2d` gathers the im2col entries of the
live columns only and does one GEMM of L × k by k × N (k live columns), exactly the conv's
output for N·k·L MACs instead of N·C·kh·kw·L. A linear layer's columns are its inputs:
:class:`LiveInputLinear` gathers the live inputs and multiplies by the N × k weight.

Both are an ``nn.Linear`` plus index buffers and standard tensor ops (concatenation,
gather, matmul), so ``torch.utils.flop_counter`` sees the GEMM (the gather is a copy, not
MACs) and ``torch.export`` writes them as ordinary graphs. Gathering only the live rows, rather
than unfolding every column and selecting, is what makes the smaller GEMM a faster layer
(``scripts/ssl_layers.py`` measures it against ``nn.Conv2d``).

:func:`drop_dead_columns` replaces, in place, every given layer that has dead columns.
Filter-wise rows and whole channels are the prune compressor's job (they change the
neighbouring layers too); run it before this, so only the remaining dead columns are left.
"""

from __future__ import annotations

import warnings

import torch
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

    The forward works in NHWC (channels-last) order, where the im2col matrix of the live
    columns is one gather from each image's pixels: output position (y, x) of image b reads
    x[b, y·stride + i·dilation − pad, x·stride + j·dilation − pad, c] for live column
    (c, i, j), and a read outside the image reads a zero appended after the image's pixels.
    Then one GEMM, columns (B·L × k) · W_liveᵀ (k × N), gives the output in NHWC order,
    returned as a channels-last NCHW tensor (a view, no copy). NHWC is what makes the layer
    fast: gathering within each image's own NHWC pixels needs no transpose of the input or
    the output (an NCHW version with the batch as the GEMM's inner dimension spent more time
    transposing than multiplying; scripts/bench_speedup.py), and a
    network running channels-last hands its layers NHWC inputs for free.

    The appended zero, rather than ``F.pad``, and the copy it makes are for TorchInductor,
    which fuses what comes before a gather into it: a pad became bounds arithmetic on every
    read (integer divisions per element), and without any copy before the gather the
    previous layers' elementwise work and pooling were recomputed for every read of a
    pixel, k times over. So a padded layer, and any layer being compiled or exported
    (``torch.compiler.is_compiling``), gathers from one copy of its input with the zero
    appended; compiled, the layer is then about as fast as eager, not 3–6× slower at batch
    32. Eagerly, an unpadded layer gathers from its input itself: the copy cost ResNet-50's
    SSL model at 75 % about a tenth of its time at batch 32 (measured).

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
        self.indices: dict = {}  # gather_index's, per input size and device (not state)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(batch, -1)  # NHWC; a view when channels-last
        if self.padding != (0, 0) or torch.compiler.is_compiling():  # see the docstring
            pixels = torch.cat([pixels, pixels.new_zeros(batch, 1)], dim=1)
        index, out_h, out_w = self.gather_index(height, width, channels, x)
        columns = pixels.gather(1, index.expand(batch, -1))
        columns = columns.view(batch * out_h * out_w, self.channel.shape[0])
        w, bias = self.gemm.weight, self.gemm.bias
        out = columns @ w.t() if bias is None else torch.addmm(bias, columns, w.t())
        return out.view(batch, out_h, out_w, w.shape[0]).permute(0, 3, 1, 2)

    def gather_index(self, height: int, width: int, channels: int,
                     x: Tensor) -> tuple[Tensor, int, int]:
        """Where, in one NHWC image of ``height`` × ``width`` × ``channels`` followed by a
        zero, each output position reads each live column (an (L·k,) index; reads in the
        padding point at the zero), and the output's height and width. Kept per input size
        and device: built afresh on every call, its few small ops took about 30 % of an
        SSL-compressed ResNet-50's time at batch 1. Not kept when ``x`` is not a plain
        tensor: an index made of the fake tensors that tracers run on would outlive the
        trace."""
        key = (height, width, channels, x.device)
        if key in self.indices:
            return self.indices[key]
        (sh, sw), (ph, pw), device = self.stride, self.padding, x.device
        out_h = (height + 2 * ph - self.span[0]) // sh + 1
        out_w = (width + 2 * pw - self.span[1]) // sw + 1
        rows = (torch.arange(out_h, device=device) * sh - ph)[:, None] + self.row  # (out_h, k)
        cols = (torch.arange(out_w, device=device) * sw - pw)[:, None] + self.col  # (out_w, k)
        inside = (((rows >= 0) & (rows < height))[:, None] &
                  ((cols >= 0) & (cols < width))[None, :])  # (out_h, out_w, k)
        index = (rows[:, None] * width + cols[None, :]) * channels + self.channel
        found = (torch.where(inside, index, height * width * channels).flatten(),
                 out_h, out_w)
        if type(x) is Tensor:
            self.indices[key] = found
        return found

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
def drop_dead_columns(model: nn.Module, layers: list[tuple[str, nn.Module]], *,
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
            if check is None or check.keeps(name, layer, live_layer, entry=report[name],
                                            flag="replaced", label="live_columns"):
                model.set_submodule(name, live_layer)
        elif dead > 0:
            report[name]["reason"] = f"{dead:.0%} of the columns dead, below min_sparsity"
    return report
