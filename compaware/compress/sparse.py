"""What weight sharing and unstructured pruning have in common: the architecture stays, the
weights become zeros and (with sharing) a few distinct values per layer.

Such a model is smaller in storage, not in shape, so these compressors write it in the
sparse format of :mod:`compaware.compress.storage` (its size is ``bytes.compressed``), and
fine-tune it under :class:`KeepStructure`, which keeps the zeros zero and the shared weights
shared.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from compaware.compress import storage
from compaware.compress.base import Compressor
from compaware.config import check_choice
from compaware.layers import LayerSelection
from compaware.regularizers import Regularizer

FILE_NAME = "model_compressed.cwsf"
BIT_MODEL = ("Han et al. 2016: per coded layer a float32 codebook (entry 0 = 0.0), CSR with "
             "(rows+1) row pointers of ceil(log2(entries+1)) bits, per stored entry a relative "
             "column index of 5 bits (linear) / 8 bits (conv) with filler entries on overflow "
             "and a ceil(log2 k)-bit codebook index (float32 without a codebook); shared "
             "biases as codebook indices; every other tensor raw; no entropy coding")


class SparseCompressor(Compressor):
    """Base of compressors that zero and/or share the selected layers' weights in place.

    ``shared``: the values of a layer come from a codebook (weight sharing) rather than being
    free float32 (pruning only). ``entropy`` (``none``, ``zlib``, ``lzma``) compresses the
    stored streams further with the standard library.
    """

    shared = True
    shared_biases = False  # whether biases are quantized with their layer's weights

    def __init__(self, layers: str = "all", skip_first: bool = False, skip_last: bool = False,
                 entropy: str = "none") -> None:
        self.select = LayerSelection("compress", layers, skip_first, skip_last)
        check_choice("compress.entropy", entropy, tuple(storage.CODECS))
        self.entropy = entropy

    def codings(self, model: nn.Module) -> dict[str, storage.LayerCoding]:
        """How each selected layer of ``model`` is stored."""
        return {name: storage.LayerCoding(
                    "linear" if isinstance(layer, nn.Linear) else "conv", self.shared,
                    self.shared and self.shared_biases and layer.bias is not None)
                for name, layer in self.select(model)}

    def save(self, model: nn.Module, run_dir: Path) -> dict:
        stored = storage.write(model, self.codings(model), run_dir / FILE_NAME, self.entropy)
        return {"file": FILE_NAME, "bytes": stored.bytes,
                "predicted_bytes": stored.predicted_bytes, "entropy": self.entropy,
                "bit_model": BIT_MODEL}

    def finetune_constraint(self, model: nn.Module, keep_zeros: bool = False) -> Regularizer:
        """Zeros are always kept here (``keep_zeros`` changes nothing), and so is sharing."""
        groups = []
        for name, coding in self.codings(model).items():
            groups.append([f"{name}.weight"] + ([f"{name}.bias"] if coding.shared_bias else []))
        return KeepStructure(model, groups, self.shared)


def nonzero_fraction(tensor: Tensor) -> float:
    return float(tensor.count_nonzero()) / max(tensor.numel(), 1)


class KeepStructure(Regularizer):
    """Fine-tuning that keeps what compression made, by editing the gradients before each
    optimizer step: pruned weights get a zero gradient and, with ``shared``, every member of a
    shared value (within a group: a layer's weight, with its bias where that shares the
    codebook) gets the sum of its members' gradients.

    That sum is the gradient of the shared value itself (Deep Compression's centroid
    fine-tuning). Since the members start equal and then see the same gradients, any
    elementwise optimizer (SGD, momentum, Adam, weight decay) moves them identically: the
    optimizer trains the shared value, and zeros stay exactly zero.
    """

    def __init__(self, model: nn.Module, groups: list[list[str]], shared: bool) -> None:
        super().__init__()
        self.groups, self.shared = groups, shared
        self.zero: list[Tensor] = []  # per group: where its values are zero
        self.keys: list[Tensor] = []  # shared: each value's index among the distinct values
        with torch.no_grad():
            for names in groups:
                values = torch.cat([model.get_parameter(n).reshape(-1) for n in names])
                self.zero.append(values == 0)
                if shared:
                    self.keys.append(torch.unique(values, return_inverse=True)[1])

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        for i, names in enumerate(self.groups):
            params = [model.get_parameter(n) for n in names]
            grads = torch.cat([_grad(p).reshape(-1) for p in params])
            if self.shared:
                key = self.keys[i]
                grads = grads.new_zeros(int(key.max()) + 1).index_add_(0, key, grads)[key]
            zero = self.zero[i]
            grads[zero] = 0
            start = 0
            for p in params:
                p.grad = grads[start:start + p.numel()].view_as(p).clone()
                start += p.numel()


def _grad(param: nn.Parameter) -> Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)
