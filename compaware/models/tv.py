"""Any torchvision classifier by name (``model=torchvision model.name=mobilenet_v2``).

Built without pretrained weights unless ``model.weights`` names some (``DEFAULT``,
``IMAGENET1K_V1``: torchvision's weights enum of the model), which are read from the torch
hub cache, never downloaded, and checked against the hash in their file's name
(:func:`hub_file`). Built with the data's class count, with its first conv rebuilt when the
data does not have 3 channels, and, for the transformers built for one input size (ViT,
MaxViT), for the data's image size: a size their patches or attention partitions do not
divide stops at start, naming the sizes that work. Other models take any size their pooling
allows; one that does not fit stops at start (:func:`compaware.models.check_input_fits`).

GoogLeNet and Inception-v3 are built without their auxiliary classifiers
(``aux_logits=False``): in training mode those make the model return a named tuple of
logits, which the training loop's loss does not take, and they serve only as extra loss
terms in the papers' training recipes.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from compaware.config import UserError

log = logging.getLogger(__name__)


def classifier_names() -> list[str]:
    """torchvision's image classifiers (not detection, segmentation, video, optical flow)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_classifier(name: str, in_channels: int = 3, num_classes: int = 1000,
                           image_size: int = 224, weights: str | None = None,
                           new_head: bool = False) -> nn.Module:
    """``weights``: torchvision's trained weights by name, from the hub cache; a data set
    with other classes than theirs stops, unless ``new_head`` replaces the classifier's
    layers that do not fit with freshly initialised ones (transfer to the data's classes)."""
    names = classifier_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UserError(f"model.name={name!r} is not a torchvision classifier.{hint} "
                        f"model.name takes one of: {', '.join(names)}.")
    check_size(name, image_size)
    if weights is not None:
        return pretrained_classifier(name, weights, in_channels, num_classes,
                                     image_size=image_size, new_head=new_head)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                         **size_arguments(name, image_size),
                                         **AUX_FREE.get(name, {}))
    if in_channels != 3:
        adapt_first_conv(model, in_channels)
    return model


def pretrained_classifier(name: str, weights: str, in_channels: int, num_classes: int, *,
                          image_size: int, new_head: bool) -> nn.Module:
    """``name`` with torchvision's ``weights`` (a name of its weights enum), read from the hub
    cache by torchvision's own builder (which adapts the model to its weights, e.g.
    GoogLeNet's auxiliary classifiers), but unpickling tensors only."""
    enum = torchvision.models.get_model_weights(name)
    try:
        chosen = enum.verify(str(weights))
    except KeyError:
        raise UserError(f"model.weights={weights!r} is not a weights name of {name}; "
                        f"model.weights takes one of: DEFAULT, "
                        f"{', '.join(w.name for w in enum)} (or null: random weights).") from None
    path = hub_file(chosen)
    if in_channels != 3:
        raise UserError(f"model.weights={weights}: {name}'s weights read colour images, but "
                        f"the data has {in_channels} channel(s). Use colour data (imagefolder: "
                        f"data.channels=3 reads every image as colour), or model.weights=null.")
    classes = len(chosen.meta["categories"])
    if classes != num_classes and not new_head:
        raise UserError(f"model.weights={weights}: {name}'s weights classify {classes} "
                        f"categories, but the data has {num_classes} classes. Set "
                        f"model.new_head=true to replace the classifier layers that do not fit "
                        f"with freshly initialised ones (then fine-tune: "
                        f"schedule.finetune_epochs), or use data with those {classes} classes.")
    try:
        with tensors_only():
            model = torchvision.models.get_model(name, weights=chosen,
                                                 **size_arguments(name, image_size))
    except ValueError as e:  # a builder argument the weights fix (ViT's image size)
        raise UserError(f"model.weights={weights} of {name}: {e} Set the data option it "
                        f"names (image_size: data.image_size).") from None
    except Exception as e:  # torch's errors for a damaged file, or one holding code
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"model.weights={weights}: {path} cannot be loaded as {name}'s "
                        f"weights (a damaged or different file?): {reason[:300]}") from None
    if classes == num_classes:
        return without_auxiliary_heads(model)
    for_data = torchvision_classifier(name, in_channels, num_classes, image_size)
    fresh = transplant(model, for_data)
    log.warning("model.new_head=true: %s starts from %s except %s, freshly initialised for %d "
                "classes instead of %d: fine-tune it (schedule.finetune_epochs).",
                name, path.name, ", ".join(fresh), num_classes, classes)
    return for_data


def without_auxiliary_heads(model: nn.Module) -> nn.Module:
    """``model`` with its training-mode auxiliary classifiers removed (Inception-v3 keeps them
    when built with weights, and its builder refuses aux_logits=False beside weights): what its
    builder does after loading when asked, so training sees one output, as without weights."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for head in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, head):
                setattr(model, head, None)
    return model


def hub_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision keeps ``weights``: ``<torch hub dir>/checkpoints/<file of its URL>``
    (``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``). Absent: a :class:`UserError`
    saying where to put which file, since compaware downloads nothing."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not path.is_file():
        raise UserError(f"model.weights: {weights} is not in the torch hub cache, and "
                        f"compaware downloads nothing. Put {weights.url} at {path} "
                        f"(e.g. curl -L --create-dirs -o {path} {weights.url}, or copy it from a "
                        f"machine where torchvision downloaded it), or point TORCH_HOME at the "
                        f"folder whose hub/checkpoints/ holds it.")
    expected = name_hash(path.name)
    if expected is not None:
        digest = sha256(path)
        if not digest.startswith(expected):
            raise UserError(f"model.weights: {path} is not torchvision's file for {weights}: "
                            f"its SHA-256 begins {digest[:len(expected)]}, the file's name says "
                            f"{expected} (damaged, cut short, or another file saved under that "
                            f"name). Replace it with {weights.url}.")
    return path


def name_hash(name: str) -> str | None:
    """The SHA-256 prefix in a hub file's name (``resnet18-f37072fd.pth``), or None. torch.hub
    checks it only when it downloads the file, not when it finds it in the cache, where a
    file may have been copied by hand."""
    match = torch.hub.HASH_REGEX.search(name)
    return match.group(1) if match else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def tensors_only() -> Iterator[None]:
    """Make every ``torch.load`` unpickle tensors and plain data only: torchvision's builders
    load the hub file with ``weights_only=False``, which would run any code a file put in
    the cache holds."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def transplant(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy into ``target`` every tensor of ``source`` with the same name and shape; returns
    the names of ``target``'s tensors left as they were (the classifier, for a model built
    for another class count)."""
    given = source.state_dict()
    state = target.state_dict()
    kept = [key for key, value in state.items()
            if key not in given or given[key].shape != value.shape]
    target.load_state_dict({**state, **{key: given[key] for key in state if key not in kept}})
    return kept


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
