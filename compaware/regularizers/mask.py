"""Fine-tuning with the zero structure frozen (``schedule.finetune_mask=true``).

SSL fine-tunes its sparse network with the zeros held fixed (the official code's masks).
A compressed model needs no mask (what was removed is gone), but an uncompressed one
(``compress=none``, or structure no compressor removes) would regrow its zero groups under
plain SGD. This stage "regularizer" records which parameter entries are exactly zero when
fine-tuning starts and puts them back to zero after every optimizer step (the ``prox`` hook
with ``every=step``), whichever regularizer made them zero. Zero groups therefore stay
zero; so does every other exact zero of the trained model (e.g. a BN β that was zeroed).
"""

from __future__ import annotations

import torch
from torch import nn

from compaware.regularizers.base import Regularizer


class FrozenZeros(Regularizer):
    """Keeps the exact zeros of ``model``'s parameters at zero, after every step."""

    every = "step"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.zeros = {name: p.detach() == 0 for name, p in model.named_parameters()
                      if bool((p == 0).any())}

    @torch.no_grad()
    def prox(self, model: nn.Module, step: float) -> None:
        for name, p in model.named_parameters():
            if name in self.zeros:
                p.masked_fill_(self.zeros[name], 0)
