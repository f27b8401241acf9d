"""Checkpoints that survive interruption, refuse to run code and notice damage.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed
over the old file: a reader sees the old checkpoint or the new one, never half of
one. Reads use ``torch.load(weights_only=True)``, which unpickles only tensors and
plain containers, so a checkpoint cannot execute code. A checkpoint carries the SHA-256 of
its contents (every key, value and tensor byte), checked when it is read back: a flipped bit
in a weight would otherwise load silently and surface epochs later as a divergence. Anything
unreadable or damaged becomes a :class:`UserError` saying which file and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from compaware.config import UserError

_UMASK = os.umask(0o022)  # read the process's umask (only os.umask can) and put it back
os.umask(_UMASK)


def write_atomically(path: str | os.PathLike, write: Callable[[Any], None],
                     mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``.

    A write that fails (full disk, read-only folder) leaves the previous file as it was
    and becomes a :class:`UserError` saying so.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # from a process killed mid-write
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError whose context is the OSError.
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(e, OSError | RuntimeError) and isinstance(cause, OSError):
            raise UserError(
                f"cannot write {path}: {cause.strerror or cause} (is the disk full or the "
                f"folder read-only?). The previous {path.name}, if any, is unchanged; free "
                f"space or fix the permissions, then continue the run with resume=true and "
                f"the same hydra.run.dir.") from None
        raise


CHECKSUM = "sha256"  # the key of a checkpoint's checksum


def save(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` ``state`` with its checksum to ``path`` atomically."""
    write_atomically(path, lambda f: torch.save({**state, CHECKSUM: digest(state)}, f))


def digest(tree: Any) -> str:
    """SHA-256 of a checkpoint's contents: keys, plain values, and each tensor's dtype, shape
    and bytes, in order."""
    sha = hashlib.sha256()

    def visit(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            sha.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            sha.update(f"dict {len(node)};".encode())
            for key, value in node.items():
                sha.update(f"{key!r}:".encode())
                visit(value)
        elif isinstance(node, list | tuple):
            sha.update(f"{type(node).__name__} {len(node)};".encode())
            for value in node:
                visit(value)
        else:
            sha.update(f"{type(node).__name__} {node!r};".encode())

    visit(tree)
    return sha.hexdigest()


def save_json(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_atomically(path, lambda f: json.dump(data, f, indent=2), mode="w")


def load(path: str | os.PathLike, checked: bool = True) -> dict:
    """A checkpoint written by :func:`save`, loaded without executing any code, its checksum
    verified (``checked=False``: a file from elsewhere, e.g. a plain state_dict for
    ``init_from``, which is verified only if it carries one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad files; all mean "unreadable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} cannot be loaded: it is truncated, corrupted, or holds objects "
            f"other than tensors and plain data, which compaware refuses to unpickle "
            f"(weights_only=True). Reason: {reason[:300]}") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a compaware "
                        f"checkpoint dictionary.")
    recorded = state.pop(CHECKSUM, None)
    if recorded is None and checked:
        raise UserError(f"checkpoint {path} carries no checksum: it was not written by this "
                        f"version of compaware, and a damaged file could not be told from a "
                        f"good one. Start a new run (or pass it as init_from).")
    if recorded is not None and recorded != digest(state):
        raise UserError(f"checkpoint {path} is damaged: its contents do not match the "
                        f"checksum written with them (a changed bit on disk or in transfer). "
                        f"Restore the file from a copy, or start the run again.")
    return state


def check_fits(model: torch.nn.Module, saved: Path) -> None:
    """Stop a resumed run whose ``model`` (rebuilt, e.g. by compression) differs in shape from
    the one checkpointed in ``saved``: continuing would load weights into the wrong layers,
    or fail deep inside torch. Nothing when there is no such checkpoint yet."""
    if not saved.exists():
        return
    before = {name: list(t.shape) for name, t in load(saved)["model"].items()}
    now = {name: list(t.shape) for name, t in model.state_dict().items()}
    differ = sorted(name for name in before.keys() | now.keys()
                    if before.get(name) != now.get(name))
    if differ:
        shown = ", ".join(f"{name} {before.get(name, 'absent')} → {now.get(name, 'absent')}"
                          for name in differ[:4]) + (", …" if len(differ) > 4 else "")
        raise UserError(f"resume: compression rebuilt a model other than the one fine-tuning "
                        f"checkpointed in {saved} ({shown}). Start a new run, or delete "
                        f"{saved.name} to fine-tune the rebuilt model from the start.")


def load_weights(model: torch.nn.Module, source: str | os.PathLike) -> None:
    """Load dense weights for ``init_from``: a run directory (its final training checkpoint)
    or a file holding a state_dict: plain, or under ``model`` (compaware's checkpoints),
    ``state_dict`` (Lightning) or ``model_state_dict``, its names possibly prefixed
    (``module.`` of DDP, ``model.`` of a LightningModule; :func:`fit_names`). Names and
    shapes must then match the configured model."""
    source = Path(source)
    path = source / "checkpoints" / "train.pt" if source.is_dir() else source
    if source.is_dir() and not path.is_file():
        found = ", ".join(sorted(p.name for p in (source / "checkpoints").glob("*.pt")))
        raise UserError(f"init_from={source} is a run directory without checkpoints/train.pt "
                        f"(it has {found or 'no checkpoint'}). init_from takes the directory of "
                        f"a run that trained, or a checkpoint file such as "
                        f"<run dir>/checkpoints/finetune.pt.")
    if not path.is_file():
        raise UserError(f"init_from={source} does not exist. init_from takes a weights file "
                        f"(a state_dict, or a checkpoint holding one) or the directory of a run.")
    try:
        state = load(path, checked=False)
    except UserError as e:
        raise UserError(f"init_from={source}: {e} A weights file for compaware is a state_dict "
                        f"saved with torch.save(model.state_dict(), path).") from None
    model.load_state_dict(fit_names(weights_in(state), model.state_dict(),
                                    f"init_from={source}"))


# Where files keep their state_dict: compaware and many scripts, Lightning, common tutorials.
WRAPPERS = ("model", "state_dict", "model_state_dict")


def weights_in(state: dict) -> dict:
    """The state_dict in a loaded file: under the first of :data:`WRAPPERS` that holds a
    dictionary, or the file itself."""
    return next((state[key] for key in WRAPPERS if isinstance(state.get(key), dict)), state)


def fit_names(weights: dict, wanted: dict, what: str) -> dict:
    """``weights`` renamed to ``wanted``'s names (a model's state_dict): as they are, or with
    the one prefix removed (``module.``, ``model.``, ``module.model.`` …) under which they
    are exactly those names; entries outside that prefix (a LightningModule's loss or
    metrics) are left out. Anything else, or a shape that differs, is a :class:`UserError`
    listing a few names, ``what`` naming the option."""
    fitting = next((candidate for candidate in _renamings(weights, wanted)
                    if candidate.keys() == wanted.keys()), None)
    if fitting is None:
        missing = [key for key in wanted if key not in weights]
        unexpected = [key for key in weights if key not in wanted]
        raise UserError(f"{what}: its weights do not fit the configured model (is model= the "
                        f"architecture they were saved from, for the data's classes?): the "
                        f"model's {_few(missing)} are missing from the file, which has "
                        f"{_few(unexpected)} that the model lacks.")
    differ = [f"{key} {tuple(getattr(fitting[key], 'shape', ()))} in the file, "
              f"{tuple(value.shape)} in the model" for key, value in wanted.items()
              if getattr(fitting[key], "shape", None) != value.shape]
    if differ:
        raise UserError(f"{what}: its weights have the model's names but not its shapes: "
                        f"{_few(differ)} (is model= configured as when they were saved, with "
                        f"the data's classes and channels?).")
    return fitting


def _renamings(weights: dict, wanted: dict) -> Iterator[dict]:
    """``weights`` as they are, then without each prefix that turns one of their names into
    the model's first name, shortest first."""
    yield weights
    first = next(iter(wanted), None)
    prefixes = sorted({key[:-len(first)] for key in weights
                       if first is not None and key.endswith(f".{first}")}, key=len)
    for prefix in prefixes:
        yield {key[len(prefix):]: value for key, value in weights.items()
               if key.startswith(prefix)}


def _few(names: list[str], shown: int = 4) -> str:
    if not names:
        return "no names"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
