"""``model_compressed.pt``: the compressed model as a trainable module, for further training.

The standalone ``model_compressed.pt2`` is a graph with its weights, for inference: it loads
with torch alone but cannot be trained further (its BatchNorms are folded into the convs, and
a ``torch.export`` module is not meant to be trained). This file keeps the module fine-tuning
left, the same classes (torch's layers, torchvision's blocks, compaware's models and
compressed layers) and the same ``state_dict`` keys, so that
``compaware.load_model(path)`` gives back a model that trains, with compaware installed.

An ``nn.Module`` of any architecture a compressor rebuilt is only kept whole by pickling it,
but this file is never unpickled freely. The module's pickle is read by
``torch.load(weights_only=True)`` with an allowlist of the classes the file names, each of
which must be an ``nn.Module`` class of torch.nn, torchvision or compaware (or a class the
caller passes), plus ``functools.partial`` (a torchvision ViT keeps its norm layer's): a file
that names anything else (``os.system``, say) is refused before any of it is imported or
called.
Around that pickle the file is a compaware checkpoint (compaware/checkpoint.py): written
atomically, with a format version and the SHA-256 of its contents, checked when read.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compaware import checkpoint
from compaware.config import UserError
from compaware.deploy.export import keep_onnx

log = logging.getLogger(__name__)

FORMAT = "compaware.model"
VERSION = 1  # raised when the file's layout changes; a reader refuses other versions
# Where the module classes a file may name live: torch's layers (not torch.fx or torch.jit,
# whose modules rebuild themselves from code), torchvision's models and blocks, compaware's.
TRUSTED_PACKAGES = ("torch.nn", "torchvision", "compaware")
# Not a module class, but harmless to rebuild: it only records a callable and its arguments.
OTHER_GLOBALS = {"functools.partial": functools.partial}


@dataclass
class ModelFile:
    """What a ``model_compressed.pt`` holds: the module, and the shape of one input (C, H, W)
    of the run that wrote it."""

    model: nn.Module
    input_shape: tuple[int, ...]


def save_model(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike) -> int:
    """Write ``model`` (its architecture, weights and buffers) with ``input_shape`` to
    ``path`` atomically; return the file's size in bytes. A model that
    cannot be pickled (a lambda in an attribute, say) raises a :class:`UserError` naming it."""
    buffer = io.BytesIO()
    try:
        torch.save(model, buffer)  # a model on a GPU is read back onto the CPU: read_model
    except Exception as e:  # pickle's errors for an attribute it cannot store
        raise UserError(f"the compressed model ({type(model).__name__}) cannot be stored as "
                        f"a trainable module: {e}") from None
    pickled = torch.frombuffer(buffer.getbuffer(), dtype=torch.uint8)
    checkpoint.save({"format": FORMAT, "version": VERSION, "input_shape": list(input_shape),
                     "module": pickled}, path)
    return Path(path).stat().st_size


def read_model(path: str | os.PathLike, classes: Iterable[type] = ()) -> ModelFile:
    """The :class:`ModelFile` at ``path`` (written by :func:`save_model`), its module on the CPU
    in eval mode. ``classes``: module classes from outside torch.nn, torchvision and compaware that
    the file may name (your own model's). A missing, damaged or foreign file, or one naming any
    other class, raises a :class:`UserError` saying which and why."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist. A run keeps its trainable compressed model as "
                        f"<run dir>/model_compressed.pt (runs of compaware before this file "
                        f"existed, and runs that failed before their benchmark, have none).")
    try:
        state = checkpoint.load(path)
    except UserError as e:
        raise UserError(f"{path} is not a readable compaware model file: {e}") from None
    if state.get("format") != FORMAT or not isinstance(state.get("module"), torch.Tensor):
        raise UserError(f"{path} is a compaware checkpoint, not a model file written by a run "
                        f"(model_compressed.pt); checkpoints/*.pt hold weights only.")
    if state.get("version") != VERSION:
        raise UserError(f"{path} has model file format version {state.get('version')}; this "
                        f"compaware reads version {VERSION}. Load it with the compaware "
                        f"version that wrote it, or use the run's model_compressed.pt2.")
    pickled = io.BytesIO(state["module"].numpy().tobytes())
    extra = {f"{c.__module__}.{c.__qualname__}": c for c in classes}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(pickled)
        pickled.seek(0)
        with torch.serialization.safe_globals(allowlist(names, extra, path)):
            model = torch.load(pickled, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # torch's unpickler's errors; the checksum matched, so rare
        raise UserError(f"{path} cannot be rebuilt: {str(e).strip()[:300]}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{path} holds a {type(model).__name__}, not a module.")
    return ModelFile(model.eval(), tuple(state["input_shape"]))


def load_model(path: str | os.PathLike, classes: Iterable[type] = ()) -> nn.Module:
    """The trainable compressed model a run kept (``<run dir>/model_compressed.pt``), on the CPU
    in eval mode: call ``.train()`` to train it further. See :func:`read_model`."""
    return read_model(path, classes).model


def allowlist(names: Iterable[str], extra: dict[str, type], path: Path) -> list[object]:
    """The objects ``names`` (``module.qualname``, the globals the pickle at ``path`` needs)
    stand for, if the allowlist admits each: one of ``extra``, :data:`OTHER_GLOBALS`, or an
    ``nn.Module`` class of :data:`TRUSTED_PACKAGES`. Only those packages' modules are imported
    to look a name up; any other name raises a :class:`UserError` naming every such one."""
    known = {**OTHER_GLOBALS, **extra}
    found, refused = [], []
    for name in sorted(names):
        if name in known:
            found.append(known[name])
            continue
        target = (_lookup(name) if name.startswith(tuple(f"{package}." for package in
                                                          TRUSTED_PACKAGES)) else None)
        if isinstance(target, type) and issubclass(target, nn.Module):
            found.append(target)
        else:
            refused.append(name)
    if refused:
        short = ", ".join(name.rsplit(".", 1)[-1] for name in refused)
        raise UserError(
            f"{path} names {', '.join(refused)}: not module classes of "
            f"{', '.join(TRUSTED_PACKAGES)} installed here, and compaware rebuilds nothing else "
            f"from a file. If they are your own model's classes and you trust the file, pass "
            f"them: compaware.load_model(path, classes=[{short}]); if they are compaware's, "
            f"load the file with the compaware version that wrote it.")
    return found


def _lookup(name: str) -> object:
    """The object at dotted ``name``: the longest importable module prefix, then attributes;
    None where there is none."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute, None)
        return found
    return None


def keep_compressed(model: nn.Module, inference: nn.Module, input_shape: tuple[int, ...],
                    run_dir: Path) -> None:
    """Write a run's ``model_compressed.pt`` (``model``, the compressed model as fine-tuned) and
    ``model_compressed.onnx`` (``inference``, its :func:`~compaware.deploy.bench.inference_model`;
    with the ``onnx`` package). Each file that cannot be written is skipped with one log line
    saying why: the run's results do not depend on them."""
    try:
        save_model(model, input_shape, run_dir / "model_compressed.pt")
    except UserError as e:
        log.warning("model_compressed.pt not written: %s", e)
    keep_onnx(inference, torch.zeros(2, *input_shape), run_dir / "model_compressed.onnx")
