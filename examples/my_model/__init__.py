"""A user's own model package, for `compaware compress model._target_=my_model.TinyNet`."""

from my_model.model import TinyNet

__all__ = ["TinyNet"]
