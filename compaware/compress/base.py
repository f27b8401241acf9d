"""The compressor interface: a trained model in, a new and physically smaller model out.

A compressor never mutates the model it is given (training may go on with it) and
never leaves masks behind: what it removes is gone from the returned module, which
is made only of standard ``torch.nn`` layers and so saves, exports and runs without
compaware. It also returns a report of what it did per layer, which ends up in
``results.json`` under ``compression``.
"""

from __future__ import annotations

import copy

from torch import nn

Report = dict[str, dict]


class Compressor:
    """``compress=none``: an unchanged copy (the dense model, benchmarked as "compressed")."""

    def __call__(self, model: nn.Module) -> tuple[nn.Module, Report]:
        return self.compress(copy.deepcopy(model))

    def compress(self, model: nn.Module) -> tuple[nn.Module, Report]:
        """Compress ``model`` (a private copy, free to modify) and report per layer."""
        return model, {}
