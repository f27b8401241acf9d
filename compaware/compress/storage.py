"""Han et al.'s sparse, weight-shared storage format (docs/methods.md), as a real file.

The bit model (Han et al. 2015/2016, "Deep Compression"), which :func:`write` both predicts
and writes, for each coded conv/linear layer, its weight seen as rows × columns
(out × in·kh·kw):

- a codebook of k float32 entries, entry 0 being 0.0 (pruned weights and fillers), the others
  the layer's distinct non-zero values;
- the non-zeros in CSR order: (rows + 1) row pointers of ⌈log2(entries + 1)⌉ bits, and per
  stored entry a relative column index (the gap to the previous entry of its row) of 5 bits
  for linear and 8 bits for conv layers, plus its value: a ⌈log2 k⌉-bit codebook index, or a
  float32 where the layer has no codebook (pruning only). A gap wider than the index can say
  is bridged by filler entries of value 0, as Han does;
- its bias as ⌈log2 k⌉-bit codebook indices where the bias shares the codebook; otherwise the
  bias is an ordinary tensor.

Every other tensor of the state dict (uncoded layers, biases, BatchNorm) is stored raw at its
dtype's width. Streams are bit-packed; with ``entropy`` each stream is instead written one
symbol per byte (or per 2 or 4 bytes) and compressed with the standard library (``zlib``:
DEFLATE, i.e. LZ77 + Huffman; ``lzma``), which stands in for Han's Huffman stage.

Without entropy coding the file is the predicted bits plus a small header per record
(names, shapes, bit widths, stream lengths) and at most a byte of padding per stream.

Layout (little-endian): ``CWSF``, version (u8), codec (u8), record count (u32); per record
its state-dict key (u8 length + UTF-8), kind (u8: 0 raw, 1 sparse), ndim (u8), dims (u32
each), then for a raw tensor its dtype name and one stream of its bytes, for a sparse layer
the relative-index bits, value bits, has-bias flag (u8 each), k and entries (u32 each),
pointer bits (u8) and the streams codebook, row pointers, relative indices, values [, bias
codes]. A stream is its byte length (u32) followed by its bytes. The file ends with the
SHA-256 of everything before it.

The reader trusts nothing: the checksum is verified before anything is parsed, every size a
record declares is checked against the bytes that carry it and against the machine's memory
before anything is allocated, a compressed stream is inflated to no more than the bytes it
must hold, and a dtype is one of a fixed list. Whatever is wrong with a file, reading it
raises :class:`DamagedFile` naming the file, never a raw parsing error or wrong weights.

The file holds every tensor of the model's state dict, so :func:`load` rebuilds the model
from it into a module of the same architecture (a "skeleton": the model class, or the
standalone ``model_compressed.pt2``); this module needs only torch, numpy and the standard
library. :func:`encode` makes the file's bytes; the compressor writes them atomically.
"""

from __future__ import annotations

import copy
import hashlib
import lzma
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

MAGIC = b"CWSF"  # compaware weight-sharing format
VERSION = 2  # 2: a SHA-256 trailer
CHECKSUM_BYTES = 32
RELATIVE_INDEX_BITS = {"linear": 5, "conv": 8}
CODECS = {"none": None, "zlib": zlib, "lzma": lzma}
RAW, SPARSE = 0, 1
FLOAT_BITS = 32
DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}  # what a raw tensor may be


class DamagedFile(ValueError):
    """A file that is not a complete, intact compaware weight-sharing file."""


@dataclass(frozen=True)
class LayerCoding:
    """How one conv/linear layer is stored."""

    kind: str  # "linear" or "conv": the width of the relative column indices
    shared: bool  # values as indices into a per-layer codebook; False: float32 values
    shared_bias: bool = False  # the bias as indices into the same codebook


@dataclass(frozen=True)
class Stored:
    """What :func:`write` wrote: the file's size and the bit model's prediction."""

    bytes: int
    predicted_bits: int

    @property
    def predicted_bytes(self) -> int:
        return math.ceil(self.predicted_bits / 8)


def bits_for(count: int) -> int:
    """Bits of an index into ``count`` things (at least 1)."""
    return max(1, (count - 1).bit_length())


# ---------------------------------------------------------------------------------- streams


def _uint_dtype(bits: int) -> np.dtype:
    return np.dtype("<u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4")


def _pack(symbols: np.ndarray, bits: int) -> bytes:
    """``symbols`` (non-negative, < 2**bits) as a big-endian bit stream, zero-padded to bytes."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    bit_matrix = (symbols.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    return np.packbits(bit_matrix.astype(np.uint8).reshape(-1)).tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    bit_matrix = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits)
    weights = np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return bit_matrix.reshape(count, bits).astype(np.uint64) @ weights


class _Writer:
    def __init__(self, entropy: str) -> None:
        self.codec = CODECS[entropy]
        self.parts: list[bytes] = []

    def fields(self, fmt: str, *values) -> None:
        self.parts.append(struct.pack("<" + fmt, *values))

    def text(self, value: str) -> None:
        data = value.encode()
        self.fields("B", len(data))
        self.parts.append(data)

    def stream(self, data: bytes) -> None:
        if self.codec is not None:
            data = self.codec.compress(data)
        self.fields("I", len(data))
        self.parts.append(data)

    def symbols(self, values: np.ndarray, bits: int) -> None:
        if self.codec is None:
            self.stream(_pack(values, bits))
        else:  # whole bytes per symbol, so the entropy coder sees the symbols
            self.stream(values.astype(_uint_dtype(bits)).tobytes())

    def floats(self, values: np.ndarray) -> None:
        self.stream(values.astype("<f4").tobytes())


class _Reader:
    """Reads a file's fields in order; every read checks that the bytes are there, and a
    stream is inflated to exactly the bytes its caller expects, no more."""

    def __init__(self, data: bytes, at: int = 0) -> None:
        self.data, self.at, self.codec = data, at, None

    def take(self, length: int) -> bytes:
        if length > len(self.data) - self.at:
            raise DamagedFile(f"it ends {length - (len(self.data) - self.at)} bytes early")
        self.at += length
        return self.data[self.at - length:self.at]

    def fields(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def text(self) -> str:
        (length,) = self.fields("B")
        return self.take(length).decode()

    def stream(self, expected: int) -> bytes:
        """The next stream, which must hold ``expected`` bytes once inflated."""
        (length,) = self.fields("I")
        data = self.take(length)
        if self.codec is not None:
            inflater = (zlib.decompressobj() if self.codec is zlib
                        else lzma.LZMADecompressor())
            data = inflater.decompress(data, expected)
        if len(data) != expected:
            raise DamagedFile(f"a stream holds {len(data)} bytes where {expected} belong")
        return data

    def symbols(self, count: int, bits: int) -> np.ndarray:
        if self.codec is None:
            return _unpack(self.stream(math.ceil(count * bits / 8)), count, bits).astype(np.int64)
        dtype = _uint_dtype(bits)
        return np.frombuffer(self.stream(count * dtype.itemsize), dtype).astype(np.int64)

    def floats(self, count: int) -> np.ndarray:
        return np.frombuffer(self.stream(4 * count), "<f4")


# ------------------------------------------------------------------------------ CSR coding


def _relative_csr(matrix: np.ndarray, index_bits: int):
    """The non-zeros of ``matrix`` as (row pointers, gaps − 1, positions of the real entries
    among all entries, values), with filler entries wherever a gap exceeds 2**index_bits."""
    rows, cols = np.nonzero(matrix)
    values = matrix[rows, cols]
    span = 1 << index_bits
    row_start = np.ones(len(rows), dtype=bool)
    row_start[1:] = rows[1:] != rows[:-1]
    previous = np.where(row_start, -1, np.concatenate([[-1], cols[:-1]]))
    gaps = cols - previous  # ≥ 1
    fillers = (gaps - 1) // span
    per_entry = fillers + 1
    real = np.cumsum(per_entry) - 1
    steps = np.full(int(per_entry.sum()), span, dtype=np.int64)
    steps[real] = gaps - fillers * span
    counts = np.bincount(np.repeat(rows, per_entry), minlength=matrix.shape[0])
    pointers = np.concatenate([[0], np.cumsum(counts)])
    return pointers, steps - 1, real, values


def _csr_positions(pointers: np.ndarray, relative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of every entry (fillers included) from row pointers and gaps − 1."""
    counts = np.diff(pointers)
    rows = np.repeat(np.arange(len(counts)), counts)
    position = np.cumsum(relative + 1)
    before_row = np.concatenate([[0], position])[pointers[:-1]]
    return rows, position - np.repeat(before_row, counts) - 1


def _codebook(values: np.ndarray) -> np.ndarray:
    """0.0 first (pruned weights and fillers), then the distinct non-zero values, sorted."""
    return np.concatenate([[0.0], np.unique(values[values != 0])]).astype(np.float32)


def _codes(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    codes = np.searchsorted(codebook[1:], values) + 1
    return np.where(values == 0, 0, codes)


def _write_sparse(out: _Writer, weight: torch.Tensor, bias: torch.Tensor | None,
                  coding: LayerCoding) -> int:
    """One coded layer; returns its bits under the storage model."""
    matrix = weight.detach().cpu().float().reshape(weight.shape[0], -1).numpy()
    shared_bias = bias.detach().cpu().float().numpy() if coding.shared_bias else None
    index_bits = RELATIVE_INDEX_BITS[coding.kind]
    pointers, relative, real, values = _relative_csr(matrix, index_bits)
    entries = len(relative)
    pointer_bits = bits_for(entries + 1)
    if coding.shared:
        everything = matrix.reshape(-1) if shared_bias is None else np.concatenate(
            [matrix.reshape(-1), shared_bias])
        codebook = _codebook(everything)
        value_bits = bits_for(len(codebook))
    else:
        codebook, value_bits = np.zeros(0, np.float32), FLOAT_BITS
    out.fields("BBBIIB", index_bits, value_bits, shared_bias is not None, len(codebook),
               entries, pointer_bits)
    out.floats(codebook)
    out.symbols(pointers, pointer_bits)
    out.symbols(relative, index_bits)
    if coding.shared:
        codes = np.zeros(entries, dtype=np.int64)
        codes[real] = _codes(values, codebook)
        out.symbols(codes, value_bits)
    else:
        stored = np.zeros(entries, dtype=np.float32)
        stored[real] = values
        out.floats(stored)
    bits = (FLOAT_BITS * len(codebook) + pointer_bits * len(pointers)
            + (index_bits + value_bits) * entries)
    if shared_bias is not None:
        out.symbols(_codes(shared_bias, codebook), value_bits)
        bits += value_bits * len(shared_bias)
    return bits


def _read_sparse(source: _Reader, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray | None]:
    index_bits, value_bits, has_bias, k, entries, pointer_bits = source.fields("BBBIIB")
    rows, columns = shape[0], math.prod(shape[1:])
    if not (index_bits <= 32 and value_bits <= 32 and pointer_bits <= 32 and k <= entries + rows + 1
            and entries <= rows * columns):
        raise DamagedFile(f"a layer declares {entries} entries, {k} shared values, and "
                          f"{index_bits}/{value_bits}/{pointer_bits}-bit fields for a "
                          f"{rows}×{columns} weight")
    codebook = source.floats(k)
    pointers = source.symbols(rows + 1, pointer_bits)
    relative = source.symbols(entries, index_bits)
    values = codebook[source.symbols(entries, value_bits)] if k else source.floats(entries)
    if pointers[0] != 0 or pointers[-1] != entries or np.any(np.diff(pointers) < 0):
        raise DamagedFile("a layer's row pointers do not add up to its entries")
    entry_rows, entry_cols = _csr_positions(pointers, relative)
    if len(entry_cols) and entry_cols.max() >= columns:
        raise DamagedFile(f"a layer stores an entry past its {columns} columns")
    matrix = np.zeros((rows, columns), dtype=np.float32)
    matrix[entry_rows, entry_cols] = values  # fillers write their 0
    bias = codebook[source.symbols(rows, value_bits)] if has_bias else None
    return torch.from_numpy(matrix.reshape(shape)), bias


# --------------------------------------------------------------------------------- the file


def _write_raw(out: _Writer, tensor: torch.Tensor) -> int:
    tensor = tensor.detach().cpu().contiguous()
    out.text(str(tensor.dtype).removeprefix("torch."))
    out.stream(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return tensor.numel() * tensor.element_size() * 8


def encode(model: nn.Module, codings: dict[str, LayerCoding],
           entropy: str = "none") -> tuple[bytes, Stored]:
    """The file of every tensor of ``model``'s state dict: the layers named in ``codings`` in
    the sparse format, the rest raw; with what it holds (its size and the predicted bits)."""
    state = model.state_dict()
    coded = {f"{name}.weight": name for name in codings}
    skip = {f"{name}.bias" for name, c in codings.items() if c.shared_bias}
    out = _Writer(entropy)
    out.parts.append(MAGIC)
    out.fields("BBI", VERSION, list(CODECS).index(entropy), len(state) - len(skip))
    bits = 0
    for key, tensor in state.items():
        if key in skip:
            continue
        out.text(key)
        out.fields("BB", SPARSE if key in coded else RAW, tensor.dim())
        out.fields(f"{tensor.dim()}I", *tensor.shape)
        if key in coded:
            coding = codings[coded[key]]
            bias = state[f"{coded[key]}.bias"] if coding.shared_bias else None
            bits += _write_sparse(out, tensor, bias, coding)
        else:
            bits += _write_raw(out, tensor)
    body = b"".join(out.parts)
    data = body + hashlib.sha256(body).digest()
    return data, Stored(len(data), bits)


def _memory_bytes() -> int:
    """The machine's physical memory: no declared tensor may be larger."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 40


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored by :func:`encode` (coded layers as float32); a file that is not
    intact raises :class:`DamagedFile` naming it."""
    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise DamagedFile(f"{path} is not a compaware weight-sharing file (no {MAGIC!r} header)")
    try:
        return _parse(data)
    except (DamagedFile, struct.error, zlib.error, lzma.LZMAError, UnicodeDecodeError,
            IndexError, ValueError, OverflowError, MemoryError) as e:
        raise DamagedFile(f"{path} is damaged and was not loaded: {e}") from None


def _parse(data: bytes) -> dict[str, torch.Tensor]:
    source = _Reader(data, at=len(MAGIC))
    version, codec, count = source.fields("BBI")
    if version != VERSION:
        raise DamagedFile(f"it has format version {version}; this reader reads {VERSION}")
    body, checksum = data[:-CHECKSUM_BYTES], data[-CHECKSUM_BYTES:]
    if len(data) < len(MAGIC) + 6 + CHECKSUM_BYTES or hashlib.sha256(body).digest() != checksum:
        raise DamagedFile("its contents do not match the checksum written with them")
    if codec >= len(CODECS):
        raise DamagedFile(f"codec {codec} is not one of {len(CODECS)}")
    source.data, source.codec = body, list(CODECS.values())[codec]
    state: dict[str, torch.Tensor] = {}
    budget = _memory_bytes()
    for _ in range(count):
        key = source.text()
        kind, ndim = source.fields("BB")
        shape = source.fields(f"{ndim}I")
        budget -= 4 * math.prod(shape)  # what the tensor takes as float32, before it is made
        if budget < 0:
            raise DamagedFile(f"{key} declares a {'×'.join(map(str, shape))} tensor: with the "
                              f"ones before it, more than this machine's memory")
        if kind == SPARSE and ndim >= 2:
            state[key], bias = _read_sparse(source, shape)
            if bias is not None:
                state[key.removesuffix("weight") + "bias"] = torch.from_numpy(bias.copy())
        elif kind == RAW:
            name = source.text()
            if name not in DTYPES:
                raise DamagedFile(f"{key} has dtype {name!r}, not one of {', '.join(DTYPES)}")
            size = math.prod(shape) * DTYPES[name].itemsize
            raw = torch.tensor(np.frombuffer(source.stream(size), np.uint8))
            state[key] = raw.view(DTYPES[name]).reshape(shape)
        else:
            raise DamagedFile(f"{key} has record kind {kind} with {ndim} dimensions")
    if source.at != len(body):
        raise DamagedFile(f"{len(body) - source.at} bytes follow the last record")
    return state


def load(path: str | Path, skeleton: nn.Module) -> nn.Module:
    """A copy of ``skeleton`` (same architecture) holding the weights stored at ``path``."""
    model = copy.deepcopy(skeleton)
    model.load_state_dict(read_state_dict(path))
    return model
