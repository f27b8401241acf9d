"""Han's sparse codebook format: exact round trips, the bit model by hand, agreement of the
predicted bits with the real file, and a loader that needs nothing of compaware."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from compaware.compress import KMeans, Magnitude, storage
from compaware.compress.storage import LayerCoding
from compaware.models.lenet import LeNet300


def _conv_net() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(3, 8, 3)), ("bn", nn.BatchNorm2d(8)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(8 * 6 * 6, 5))]))


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("entropy", ["none", "zlib", "lzma"])
@pytest.mark.parametrize("compressor", [Magnitude(q=1.0), KMeans(linear_bits=3, conv_bits=4)])
def test_round_trip_is_exact(tmp_path, compressor, entropy):
    torch.manual_seed(0)
    model = _conv_net()
    model(torch.randn(4, 3, 8, 8))  # BatchNorm running stats and its int64 counter
    compressed, _ = compressor(model)
    compressor.entropy = entropy
    compressor.save(compressed, tmp_path)
    reloaded = storage.load(tmp_path / "model_compressed.cwsf", _conv_net())
    _assert_same_state(compressed, reloaded)


def _write(model: nn.Module, codings: dict, path: Path) -> storage.Stored:
    data, stored = storage.encode(model, codings)
    path.write_bytes(data)
    return stored


def test_shared_biases_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # values from a 4-entry codebook, zeros included, biases too
        for p in model.parameters():
            p.copy_(torch.tensor([0.0, 0.0, -0.5, 0.25])[torch.randint(4, p.shape)])
    codings = {name: LayerCoding("linear", shared=True, shared_bias=True)
               for name in ("0", "2")}
    stored = _write(model, codings, tmp_path / "m.cwsf")
    reloaded = storage.load(tmp_path / "m.cwsf", nn.Sequential(nn.Linear(40, 6), nn.ReLU(),
                                                              nn.Linear(6, 3)))
    _assert_same_state(model, reloaded)
    assert stored.predicted_bytes <= stored.bytes <= (stored.predicted_bytes + 2 * 64  # headers
                                                        + storage.CHECKSUM_BYTES)


def test_bit_model_by_hand_with_filler_entries(tmp_path):
    """Row 0: non-zeros at columns 0 and 70, row 1 at column 99, linear (5-bit gaps, up to
    32): the gap of 70 needs 2 fillers, the gap of 100 needs 3, so 8 entries in all."""
    layer = nn.Linear(100, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0], layer.weight[0, 70], layer.weight[1, 99] = 0.5, -1.0, 2.0
    stored = _write(nn.Sequential(layer), {"0": LayerCoding("linear", shared=True)},
                    tmp_path / "m.cwsf")
    codebook = 32 * 4  # 0.0 plus three values
    pointers = 3 * 4  # rows + 1 pointers of ceil(log2(8 + 1)) bits
    entries = 8 * (5 + 2)  # relative index + ceil(log2 4)-bit code
    bias = 2 * 32  # an unshared bias is a raw float32 tensor
    assert stored.predicted_bits == codebook + pointers + entries + bias
    reloaded = storage.load(tmp_path / "m.cwsf", nn.Sequential(nn.Linear(100, 2)))
    assert torch.equal(reloaded[0].weight, layer.weight)


@pytest.mark.parametrize("compressor", [Magnitude(q=1.5), KMeans(linear_bits=6)])
def test_file_size_agrees_with_the_bit_model(tmp_path, compressor):
    torch.manual_seed(0)
    compressed, _ = compressor(Magnitude(q=1.5)(LeNet300())[0])
    saved = compressor.save(compressed, tmp_path)
    assert saved["bytes"] == (tmp_path / saved["file"]).stat().st_size
    assert saved["predicted_bytes"] <= saved["bytes"] <= 1.03 * saved["predicted_bytes"]


def test_entropy_coding_shrinks_a_shared_model(tmp_path):
    torch.manual_seed(0)
    compressed, _ = KMeans(linear_bits=6)(Magnitude(q=1.5)(LeNet300())[0])
    sizes = {}
    for entropy in ("none", "zlib"):
        sizes[entropy] = KMeans(entropy=entropy).save(compressed, tmp_path)["bytes"]
    assert sizes["zlib"] < sizes["none"]


def test_the_loader_runs_without_compaware(tmp_path):
    torch.manual_seed(0)
    compressor = KMeans(linear_bits=4)
    compressed, _ = compressor(LeNet300())
    compressor.save(compressed, tmp_path)
    torch.save(compressed.state_dict(), tmp_path / "expected.pt")
    script = (
        "import importlib.util, sys, torch\n"
        "spec = importlib.util.spec_from_file_location('storage', sys.argv[1])\n"
        "storage = sys.modules['storage'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(storage)\n"
        "state = storage.read_state_dict(sys.argv[2])\n"
        "expected = torch.load(sys.argv[3], weights_only=True)\n"
        "assert 'compaware' not in sys.modules\n"
        "assert all(torch.equal(state[k], expected[k]) for k in expected)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script, storage.__file__,
                          str(tmp_path / "model_compressed.cwsf"), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_file_of_another_format_is_refused(tmp_path):
    (tmp_path / "x.cwsf").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a compaware"):
        storage.read_state_dict(tmp_path / "x.cwsf")
