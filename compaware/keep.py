"""What fine-tuning keeps of what compression made: one mechanism, chosen by the compressor.

A compressed model is fine-tuned without the regularizer, but some of what compression made
lives in the values rather than in the shapes: the zeros of unstructured pruning, the shared
values of weight sharing, SSL's zero groups in a model no compressor shrank
(``schedule.finetune_mask``). Plain SGD would regrow them. :class:`KeepStructure` keeps them
by editing the gradients between ``backward`` and the optimizer step (the loop calls
``after_backward``): a zero gets a zero gradient, and every member of a shared value the mean
of its members' gradients.

That mean is the gradient of the shared value (their sum, Deep Compression's centroid
gradient) divided by the number of weights sharing it, so a shared value moves at the pace of
one weight at the same lr. With the sum, the fine-tuning lr that suits single weights makes
steps as many times too large as the value has members (about 13,000 for each of the 31 values
of LeNet-5's fc1 at 5 bits), and SGD diverges; Adam, invariant to the gradient's scale, trains
alike with either. Since the members start equal and then see the same gradients, any
elementwise optimizer (SGD, momentum, Adam, weight decay) moves them identically: the
optimizer trains the shared value, and zeros stay exactly zero (their gradient, momentum and
decay are all zero).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KeepStructure:
    """Keeps the zeros (and, with ``shared``, the shared values) of ``model``'s parameters
    named in ``groups``: each group a list of parameter names whose values share one
    codebook (a layer's weight, with its bias where that shares the codebook)."""

    def __init__(self, model: nn.Module, groups: list[list[str]], shared: bool) -> None:
        self.groups, self.shared = groups, shared
        self.zero: list[Tensor] = []  # per group: where its values are zero
        self.keys: list[Tensor] = []  # shared: each value's index among the distinct values
        self.counts: list[Tensor] = []  # shared: how many values share each distinct value
        with torch.no_grad():
            for names in groups:
                values = torch.cat([model.get_parameter(n).reshape(-1) for n in names])
                self.zero.append(values == 0)
                if shared:
                    key = torch.unique(values, return_inverse=True)[1]
                    self.keys.append(key)
                    self.counts.append(torch.bincount(key).to(values.dtype))

    @classmethod
    def zeros(cls, model: nn.Module) -> KeepStructure:
        """Every exact zero of every parameter of ``model`` kept at zero."""
        return cls(model, [[name] for name, p in model.named_parameters()
                           if bool((p == 0).any())], shared=False)

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        for i, names in enumerate(self.groups):
            params = [model.get_parameter(n) for n in names]
            grads = torch.cat([_grad(p).reshape(-1) for p in params])
            if self.shared:
                key = self.keys[i]
                sums = grads.new_zeros(len(self.counts[i])).index_add_(0, key, grads)
                grads = (sums / self.counts[i])[key]
            grads[self.zero[i]] = 0
            start = 0
            for p in params:
                p.grad = grads[start:start + p.numel()].view_as(p).clone()
                start += p.numel()


def _grad(param: nn.Parameter) -> Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)
