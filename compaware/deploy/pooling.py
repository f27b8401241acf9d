"""Max-pooling off PyTorch's slow CPU kernel for NCHW tensors, for inference.

PyTorch's eager CPU ``max_pool2d`` on a contiguous (NCHW) tensor runs a scalar loop per
plane that also records argmax indices (pytorch/pytorch#51393, open since 2021; only its
channels-last path is vectorised). Measured here, 1 thread: LeNet-5's 2×2 pool of a
32 × 20 × 24 × 24 batch takes 2.5 ms, 20× a ReLU over the same tensor and longer than the
conv before it, so that the pools were 54 % of LeNet-5's eager forward pass at batch 32
(docs/performance.md) and 16–18 % of Dec8's and AlexNet's (profiled). A pool's
cost shrinks with the width only, a conv's with width in and out, so a slow pool also hides
part of what a pruned model saves.

The same maximum, taken over strided views of the input (separably: over the window's
columns, then its rows) runs on PyTorch's vectorised element-wise kernels, 3.5–7× faster on
these shapes, with the same result bit for bit (NaNs propagate in both). ``MaxPool2d`` does
that when run eagerly on a large enough contiguous CPU tensor and is ``nn.MaxPool2d``
otherwise: in NHWC, on a GPU, on small inputs, and while ``torch.export``, ``torch.compile``
or the ONNX exporter trace it, so that compilers and exported files see one pooling op
(theirs are fast). Only the ``strided_pools`` inference form swaps it in
(compaware/deploy/forms.py, ``bench.forms=[...,strided_pools]``), as a form of its own: the
exported model_*.pt2 files, the ``eager`` form and training keep ``nn.MaxPool2d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair


def pooled_size(size: int, kernel: int, *, stride: int, padding: int, dilation: int,
                ceil_mode: bool) -> int:
    """Output length of a max-pool along one axis, by PyTorch's rule (a window may start
    in the left padding, never in the right)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def strided_max_pool2d(x: Tensor, kernel_size, *, stride=None, padding=0, dilation=1,
                       ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d(x, ...)`` (without indices) as maxima of strided views of ``x``: one
    view per tap of the window, over its columns first, then over its rows."""
    (kh, kw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(padding), _pair(dilation)
    sh, sw = _pair(stride if stride else kernel_size)
    height, width = x.shape[-2:]
    out_h = pooled_size(height, kh, stride=sh, padding=ph, dilation=dh, ceil_mode=ceil_mode)
    out_w = pooled_size(width, kw, stride=sw, padding=pw, dilation=dw, ceil_mode=ceil_mode)
    span_h, span_w = (out_h - 1) * sh + 1, (out_w - 1) * sw + 1  # what one tap's view spans
    bottom = max(0, span_h + dh * (kh - 1) - height - ph)
    right = max(0, span_w + dw * (kw - 1) - width - pw)
    if ph or pw or bottom or right:  # windows reaching past the edge see −∞ there
        x = F.pad(x, (pw, right, ph, bottom), value=-math.inf)
    columns = x[..., 0:span_w:sw]
    for j in range(1, kw):
        columns = torch.maximum(columns, x[..., j * dw:j * dw + span_w:sw])
    pooled = columns[..., 0:span_h:sh, :]
    for i in range(1, kh):
        pooled = torch.maximum(pooled, columns[..., i * dh:i * dh + span_h:sh, :])
    return pooled


# Below this many input elements PyTorch's kernel is as fast: the strided form's half-dozen
# ops cost a few µs of dispatch each (LeNet-5's pools at batch 1, 3–12 k elements, ran 1.2×
# slower strided).
STRIDED_FROM = 1 << 14


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that runs eagerly on a contiguous CPU tensor of at least
    ``STRIDED_FROM`` elements as :func:`strided_max_pool2d`, and as itself everywhere else
    (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if (self.return_indices or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
                or x.dim() != 4 or x.device.type != "cpu" or x.numel() < STRIDED_FROM
                or not x.is_floating_point() or not x.is_contiguous()):
            return super().forward(x)
        return strided_max_pool2d(x, self.kernel_size, stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, ceil_mode=self.ceil_mode)


def swap_max_pools(model: nn.Module) -> int:
    """Replace every ``nn.MaxPool2d`` of ``model`` (in place) by :class:`MaxPool2d` with the
    same settings; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.MaxPool2d:
            model.set_submodule(name, MaxPool2d(
                module.kernel_size, stride=module.stride, padding=module.padding,
                dilation=module.dilation, return_indices=module.return_indices,
                ceil_mode=module.ceil_mode))
            swapped += 1
    return swapped
