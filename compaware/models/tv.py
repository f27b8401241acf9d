"""Any torchvision classifier by name (``model=torchvision model.name=mobilenet_v2``).

Built without pretrained weights (nothing is downloaded), with the data's class
count, with its first conv rebuilt when the data does not have 3 channels, and, for the
transformers built for one input size (ViT, MaxViT), for the data's image size. Other
models take any size their pooling allows; one that does not fit stops at start
(:func:`compaware.models.check_input_fits`).
"""

from __future__ import annotations

import difflib

import torchvision
from torch import nn

from compaware.config import UserError


def classifier_names() -> list[str]:
    """torchvision's image classifiers (not detection, segmentation, video, optical flow)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_classifier(name: str, in_channels: int = 3, num_classes: int = 1000,
                           image_size: int = 224) -> nn.Module:
    names = classifier_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UserError(f"model.name={name!r} is not a torchvision classifier.{hint} "
                        f"model.name takes one of: {', '.join(names)}.")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                         **size_arguments(name, image_size))
    if in_channels != 3:
        adapt_first_conv(model, in_channels)
    return model


def size_arguments(name: str, image_size: int) -> dict:
    """The builder argument that fixes the input size, for the models that have one (their
    position embeddings or attention partitions are laid out for one size)."""
    if name.startswith("vit_"):
        return {"image_size": image_size}
    if name.startswith("maxvit_"):
        return {"input_size": (image_size, image_size)}
    return {}


def adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first conv with one reading ``in_channels`` (same shape otherwise)."""
    for parent in model.modules():
        for child_name, conv in parent.named_children():
            if isinstance(conv, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(
                    in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode))
                return
