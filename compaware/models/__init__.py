"""The model registry: ``compaware/conf/model/<name>.yaml`` names a factory in ``_target_``
(or ``model._target_=pkg.module.Factory`` names the user's own).

A factory gets ``in_channels``, ``num_classes`` and ``image_size`` from the data, those of
them its signature takes (all, with ``**kwargs``), so any model runs on any dataset it fits.
One that does not fit (AlexNet's pooling leaves nothing of a 28×28 image) stops at start,
saying from which ``data.image_size`` it works.
"""

from __future__ import annotations

import inspect

import hydra.utils
import torch
from omegaconf import DictConfig
from torch import nn

from compaware.config import UserError, instantiate
from compaware.data import DataInfo
from compaware.layers import describe_failure, eval_mode

LARGEST_SIZE_TRIED = 512


def build_model(node: DictConfig, info: DataInfo) -> nn.Module:
    facts = {"in_channels": info.channels, "num_classes": info.num_classes,
             "image_size": info.image_size}
    model = instantiate(node, "model", **taken(node.get("_target_"), facts))
    check_input_fits(model, node, info)
    return model


def taken(target: str, facts: dict) -> dict:
    """The ``facts`` that ``target``'s signature takes: a user's factory may know its own
    input size or class count."""
    try:
        parameters = inspect.signature(hydra.utils.get_object(target)).parameters
    except Exception:  # not importable or no signature: instantiate() says what is wrong
        return facts
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return facts
    return {key: value for key, value in facts.items() if key in parameters}


def check_input_fits(model: nn.Module, node: DictConfig, info: DataInfo) -> None:
    """One forward pass on a blank image of the data's shape; a failure becomes a
    :class:`UserError` naming the layer and the smallest ``data.image_size`` that works."""
    error = _forward_error(model, info.channels, info.image_size)
    if error is None:
        return
    what = node.get("name") or node.get("_target_")
    smallest = smallest_fitting_size(model, info.channels, info.image_size)
    fix = (f"It works from data.image_size={smallest}: set data.image_size={smallest} or more "
           f"(the images are resized to it), or choose another model."
           if smallest else
           f"No data.image_size up to {LARGEST_SIZE_TRIED} works with "
           f"{info.channels} channel(s); choose another model.")
    raise UserError(f"model {what} does not fit data={info.name} "
                    f"({info.channels}×{info.image_size}×{info.image_size}): its forward pass "
                    f"{describe_failure(model, error)}. {fix}")


def smallest_fitting_size(model: nn.Module, channels: int, failing: int) -> int | None:
    """The smallest image size above ``failing`` the model accepts, or None below
    :data:`LARGEST_SIZE_TRIED`: doubling until one works, then bisecting."""
    if failing >= LARGEST_SIZE_TRIED:
        return None
    works = min(2 * failing, LARGEST_SIZE_TRIED)
    while _forward_error(model, channels, works) is not None:
        if works >= LARGEST_SIZE_TRIED:
            return None
        failing, works = works, min(2 * works, LARGEST_SIZE_TRIED)
    while works - failing > 1:
        middle = (failing + works) // 2
        if _forward_error(model, channels, middle) is None:
            works = middle
        else:
            failing = middle
    return works


@torch.no_grad()
def _forward_error(model: nn.Module, channels: int, size: int) -> Exception | None:
    """The exception a forward pass of blank images raises, if any: in eval mode, then in
    training mode on 2 images (what training runs; BatchNorm needs more than one value per
    channel there), with the random state and the buffers (running statistics) restored."""
    saved = [(buffer, buffer.clone()) for buffer in model.buffers()]
    with eval_mode(model), torch.random.fork_rng(devices=[]):
        try:
            model(torch.zeros(1, channels, size, size))
            model.train()
            model(torch.zeros(2, channels, size, size))
        except Exception as e:  # whatever torch raises deep inside: reported by the caller
            return e
        finally:
            for buffer, value in saved:
                buffer.copy_(value)
    return None
