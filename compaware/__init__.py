"""compaware: compression-aware training of deep networks.

Train with a compression-aware regularizer, compress the model for real, fine-tune,
and measure accuracy, parameters, MACs, bytes and latency. Start at ``train.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def load_model(path: str | os.PathLike, classes: Iterable[type] = ()) -> nn.Module:
    """The trainable compressed model a run kept (``<run dir>/model_compressed.pt``), on the
    CPU in eval mode: :func:`compaware.deploy.model_file.load_model`, imported on first call
    so that ``import compaware`` does not import torch."""
    from compaware.deploy.model_file import load_model as load

    return load(path, classes)
