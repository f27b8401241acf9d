"""Any torchvision classifier by name (``model=torchvision model.name=mobilenet_v2``).

Built without pretrained weights (nothing is downloaded), with the data's class
count, with its first conv rebuilt when the data does not have 3 channels, and, for the
transformers built for one input size (ViT, MaxViT), for the data's image size: a size
their patches or attention partitions do not divide stops at start, naming the sizes that
work. Other models take any size their pooling allows; one that does not fit stops at start
(:func:`compaware.models.check_input_fits`).

GoogLeNet and Inception-v3 are built without their auxiliary classifiers
(``aux_logits=False``): in training mode those make the model return a named tuple of
logits, which the training loop's loss does not take, and they serve only as extra loss
terms in the papers' training recipes.
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
    check_size(name, image_size)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                         **size_arguments(name, image_size),
                                         **AUX_FREE.get(name, {}))
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


# One output in training mode too (see the module's docstring). init_weights=True is what
# torchvision does by default without weights; naming it silences its FutureWarning.
AUX_FREE = {name: {"aux_logits": False, "init_weights": True}
            for name in ("googlenet", "inception_v3")}

MAXVIT_PARTITION = 7  # torchvision's maxvit_t: attention windows and grids of 7×7 cells
MAXVIT_BLOCKS = 4


def _maxvit_fits(image_size: int) -> bool:
    """Whether every MaxViT block's input (the stem and each block halve the size, as
    stride-2 3×3 convs with padding 1 do) divides into whole partitions."""
    size = (image_size - 1) // 2 + 1  # the stem
    for _ in range(MAXVIT_BLOCKS):
        size = (size - 1) // 2 + 1
        if size % MAXVIT_PARTITION:
            return False
    return True


def _vit_patch(name: str) -> int:
    return int(name.rsplit("_", 1)[1])  # vit_b_16: 16×16 patches


def fits_size(name: str, image_size: int) -> bool:
    """Whether the transformers built for one input size can be built for ``image_size``
    (any other model: always; its pooling is probed after the build)."""
    if name.startswith("vit_"):
        return image_size % _vit_patch(name) == 0
    if name.startswith("maxvit_"):
        return _maxvit_fits(image_size)
    return True


def check_size(name: str, image_size: int) -> None:
    """Stop with the nearest sizes that work when :func:`fits_size` says no (torchvision's
    own error names neither the option nor a size that works)."""
    if fits_size(name, image_size):
        return
    why = (f"cuts the image into {_vit_patch(name)}×{_vit_patch(name)} patches"
           if name.startswith("vit_") else
           f"splits the feature maps of its {MAXVIT_BLOCKS} stages into {MAXVIT_PARTITION}×"
           f"{MAXVIT_PARTITION} attention partitions")
    below = next((s for s in range(image_size - 1, 7, -1) if fits_size(name, s)), None)
    above = next(s for s in range(image_size + 1, 64 * image_size) if fits_size(name, s))
    nearest = " or ".join(f"data.image_size={s}" for s in (below, above) if s is not None)
    raise UserError(f"model.name={name} {why}, which data.image_size={image_size} does not "
                    f"fit: set {nearest} (the images are resized to it), or choose another "
                    f"model. Without pretrained weights the model is built for any size that "
                    f"fits, not only the 224 of its weights.")


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
