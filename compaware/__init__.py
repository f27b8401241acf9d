"""compaware: compression-aware training of deep networks.

Train with a compression-aware regularizer, compress the model for real, fine-tune,
and measure accuracy, parameters, MACs, bytes and latency. Start at ``train.py``.
"""

__version__ = "0.1.0"
