"""compaware: compression-aware training of deep networks.

Train with a compression-aware regularizer, compress the model for real, fine-tune,
and measure accuracy, parameters, MACs, bytes and latency. Start at ``train.py``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_model(path, classes=()):
    """The trainable compressed model a run kept (``<run dir>/model_compressed.pt``), on the
    CPU in eval mode: :func:`compaware.deploy.model_file.load_model`. Imported on first call,
    so that ``import compaware`` stays light."""
    from compaware.deploy.model_file import load_model as load

    return load(path, classes)
