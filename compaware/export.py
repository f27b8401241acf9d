"""Standalone model files: architecture and weights in one file, loadable without compaware.

We use ``torch.export`` (TorchScript's successor; ``torch.jit.trace`` is deprecated in
this torch). The exported program records the graph and the weights, not Python
code, and ``torch.export.load(path).module()`` gives back an ordinary callable
``nn.Module`` in any Python that has torch.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from compaware.checkpoint import write_atomically


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path) -> int:
    """Write ``model`` (in eval mode, batch size dynamic) to ``path``; return its size in bytes."""
    model = copy.deepcopy(model).cpu().eval()
    example = example.cpu()
    batch = torch.export.Dim.DYNAMIC
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    write_atomically(path, lambda f: torch.export.save(program, f))
    return path.stat().st_size


def load_exported(path: str | Path) -> nn.Module:
    """A model written by :func:`export_model`, as a plain callable module."""
    return torch.export.load(str(path)).module()
