"""What weight sharing and unstructured pruning have in common: the architecture stays, the
weights become zeros and (with sharing) a few distinct values per layer.

Such a model is smaller in storage, not in shape, so these compressors write it in the
sparse format of :mod:`compaware.compress.storage` (its size is ``bytes.compressed``), and
fine-tune it under :class:`~compaware.keep.KeepStructure`, which keeps the zeros zero and the
shared weights shared.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from compaware.checkpoint import write_atomically
from compaware.compress import storage
from compaware.compress.base import Compressor
from compaware.config import check_choice
from compaware.keep import KeepStructure
from compaware.layers import LayerSelection

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
                for name, layer in self.layers(model)}

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The layers whose weights this compressor zeroes or shares."""
        return self.select(model)

    def save(self, model: nn.Module, run_dir: Path) -> dict:
        data, stored = storage.encode(model, self.codings(model), self.entropy)
        write_atomically(run_dir / FILE_NAME, lambda f: f.write(data))
        return {"file": FILE_NAME, "bytes": stored.bytes,
                "predicted_bytes": stored.predicted_bytes, "entropy": self.entropy,
                "bit_model": BIT_MODEL}

    def finetune_constraint(self, model: nn.Module, keep_zeros: bool = False) -> KeepStructure:
        """Zeros are always kept here (``keep_zeros`` changes nothing), and so is sharing."""
        groups = []
        for name, coding in self.codings(model).items():
            groups.append([f"{name}.weight"] + ([f"{name}.bias"] if coding.shared_bias else []))
        return KeepStructure(model, groups, self.shared)


def nonzero_fraction(tensor: Tensor) -> float:
    return float(tensor.count_nonzero()) / max(tensor.numel(), 1)
