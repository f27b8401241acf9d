"""DecomposeMe (Alvarez & Petersson 2016; docs/papers.md): every k×k conv learned as a
vertical k×1 conv → ReLU → horizontal 1×k conv → ReLU ("1D filters").

The papers give the number of 1D layers and the widths, not the rest; what we chose is
in :data:`PRESETS` and in ``compaware/conf/model/decomposeme.yaml``:

- ``dec8`` (ImageNet-style): the conv layout of VGG-A (8 layers of 3×3, max-pool 2 after
  layers 1, 2, 4, 6 and 8), each layer decomposed: 16 1D convs. Widths follow VGG-A's
  progression ``width``·(1/8, 1/4, 1/2, 1/2, 1, 1, 1, 1): 64-128-256-256-512-512-512-512
  for the default 512 (Dec8), 640 and 768 for the wider variants. A literal "512 neurons
  in every layer" would put a 512×512 1D conv at full resolution (~20 GMACs at 224×224).
- ``dec3`` (ICDAR-style, 32×32 gray, 36 classes): 3 decomposed layers (6 1D convs), 5, 5
  and 3 wide, max-pool 2 after the first two, widths ``width``·(1/8, 1/4, 1): the last two
  1D layers start with ``width`` = 512 neurons.

Both end in global average pooling and one linear layer (the papers' point is a small
model, so no VGG-style 4096-wide head), use ``same`` padding, and have no batch norm by
default: a neuron whose filter and bias are zero is then exactly dead, which is what the
group-sparsity papers remove. ``widths`` overrides the progression layer by layer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from compaware.config import UserError, check_choice, check_range


@dataclass(frozen=True)
class Layer:
    """One decomposed layer: a kernel×1 then a 1×kernel conv, ``share`` of ``width`` wide."""

    kernel: int
    share: float
    pool: bool  # 2×2 max-pool after it


PRESETS: dict[str, tuple[Layer, ...]] = {
    "dec8": (Layer(3, 1 / 8, True), Layer(3, 1 / 4, True), Layer(3, 1 / 2, False),
             Layer(3, 1 / 2, True), Layer(3, 1, False), Layer(3, 1, True), Layer(3, 1, False),
             Layer(3, 1, True)),
    "dec3": (Layer(5, 1 / 8, True), Layer(5, 1 / 4, True), Layer(3, 1, False)),
}


class DecomposeMe(nn.Sequential):
    """A DecomposeMe network: ``conv{i}v`` (k×1) → ReLU → ``conv{i}h`` (1×k) → ReLU
    [→ ``pool{i}``] per layer, then global average pooling and ``fc``."""

    def __init__(self, preset: str = "dec8", width: int = 512, widths: list[int] | None = None,
                 batch_norm: bool = False, in_channels: int = 3, num_classes: int = 1000,
                 image_size: int = 224) -> None:
        check_choice("model.preset", preset, sorted(PRESETS))
        check_range("model.width", width, 8, integer=True)
        layers = PRESETS[preset]
        if widths is None:
            widths = [max(1, round(width * layer.share)) for layer in layers]
        elif len(widths) != len(layers):
            raise UserError(f"model.widths={list(widths)} has {len(widths)} entries; "
                            f"model.preset={preset} has {len(layers)} decomposed layers, so "
                            f"model.widths takes {len(layers)} integers (or null).")
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for i, (layer, out) in enumerate(zip(layers, widths, strict=True), start=1):
            check_range("model.widths", out, 1, integer=True)
            k = layer.kernel
            for axis, kernel, padding in (("v", (k, 1), (k // 2, 0)), ("h", (1, k), (0, k // 2))):
                modules[f"conv{i}{axis}"] = nn.Conv2d(channels, out, kernel, padding=padding,
                                                      bias=not batch_norm)
                if batch_norm:
                    modules[f"bn{i}{axis}"] = nn.BatchNorm2d(out)
                modules[f"relu{i}{axis}"] = nn.ReLU()
                channels = out
            if layer.pool:
                modules[f"pool{i}"] = nn.MaxPool2d(2)
        modules["avgpool"] = nn.AdaptiveAvgPool2d(1)
        modules["flatten"] = nn.Flatten()
        modules["fc"] = nn.Linear(channels, num_classes)
        super().__init__(modules)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as torchvision's VGG: a deep plain ReLU net trains
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
