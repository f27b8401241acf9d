"""The files a run keeps for deployment and further training, and ``compaware export``.

``model_compressed.pt`` (compaware/deploy/model_file.py) rebuilds the module fine-tuning left:
same classes, same state_dict, same outputs, and it trains; it is read with torch's
weights-only unpickler and an allowlist, so a file naming anything but a module class of
torch.nn, torchvision or compaware is refused before anything is imported or called.
``model_compressed.onnx`` gives ONNX Runtime's outputs equal to PyTorch's, and is skipped
with one log line where the onnx package is missing.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import compaware
from compaware import checkpoint, cli
from compaware.compress import ShapeDepth
from compaware.compress.shape import LiveColumnConv2d
from compaware.config import UserError, instantiate
from compaware.data import DataInfo
from compaware.deploy import export_cli, model_file
from compaware.deploy.bench import inference_model
from compaware.deploy.export import keep_onnx
from compaware.models import build_model
from compaware.train import train
from tests.test_ssl_compress import _shape_sparse_lenet

ort = pytest.importorskip("onnxruntime")

# model → its config overrides and one input's shape (C, H, W)
MODELS = {"lenet5": (["model=lenet5"], (1, 28, 28)),
          "resnet20": (["model=resnet20"], (3, 16, 16)),
          "decomposeme": (["model=decomposeme", "model.preset=dec3"], (1, 32, 32)),
          "mobilenet_v3_small": (["model=torchvision", "model.name=mobilenet_v3_small"],
                                 (3, 32, 32)),
          "vit_b_16": (["model=torchvision", "model.name=vit_b_16"], (3, 32, 32)),
          "swin_t": (["model=torchvision", "model.name=swin_t"], (3, 64, 64))}
# Settings that make each compressor rebuild the layers of an untrained model.
COMPRESSORS = {"svd": ["rank=2", "target=null"], "prune": ["ratio=0.5"],
               "prune+svd": ["ratio=0.5", "rank=2"]}
# The default suite's cases; the larger models (seconds to a minute each) are marked slow.
CASES = [*((model, compressor) for model in ("lenet5", "resnet20") for compressor in COMPRESSORS),
         *(pytest.param(model, compressor, marks=pytest.mark.slow) for model, compressor in
           [("decomposeme", "prune+svd"), ("mobilenet_v3_small", "prune"), ("vit_b_16", "svd"),
            ("vit_b_16", "prune"), ("swin_t", "svd")])]


def compressed_model(make_cfg, model: str, compressor: str) -> tuple[nn.Module, tuple]:
    """``model`` (untrained, seeded) compressed by ``compressor`` with :data:`COMPRESSORS`'s
    settings, in eval mode, and its input shape."""
    overrides, shape = MODELS[model]
    channels, size, _ = shape
    cfg = make_cfg("data=synthetic", f"data.channels={channels}", f"data.image_size={size}",
                   *overrides, f"compress={compressor}",
                   *(f"compress.{setting}" for setting in COMPRESSORS[compressor]))
    torch.manual_seed(0)
    dense = build_model(cfg.model, DataInfo("synthetic", channels, size, 10, 64))
    compressed, _ = instantiate(cfg.compress, "compress")(dense, {})
    return compressed.eval(), shape


@pytest.mark.parametrize(("model", "compressor"), CASES)
def test_the_trainable_file_rebuilds_the_model_and_trains(make_cfg, tmp_path, model,
                                                           compressor):
    original, shape = compressed_model(make_cfg, model, compressor)
    assert_rebuilt_and_trains(original, shape, tmp_path)


def test_ssls_live_column_layers_are_rebuilt_too(tmp_path):
    model, _ = _shape_sparse_lenet()
    compressed, _ = ShapeDepth()(model)
    assert isinstance(compressed.conv1, LiveColumnConv2d)
    assert_rebuilt_and_trains(compressed.eval(), (1, 28, 28), tmp_path)


def assert_rebuilt_and_trains(original: nn.Module, shape: tuple, tmp_path) -> None:
    """``original`` saved and loaded is the same module (classes, state_dict, outputs), and
    one SGD step in train mode reaches every parameter."""
    model_file.save_model(original, shape, tmp_path / "m.pt")
    loaded = compaware.load_model(tmp_path / "m.pt")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in original.modules()]
    assert loaded.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(t, original.state_dict()[k]) for k, t in loaded.state_dict().items())
    assert not loaded.training
    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    loaded.train()
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    before = [p.detach().clone() for p in loaded.parameters()]
    nn.functional.cross_entropy(loaded(x), torch.tensor([0, 1, 2, 3, 4])).backward()
    optimizer.step()
    assert all(p.grad is not None for p in loaded.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(loaded.parameters(), before, strict=True))


@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_onnx_runtime_gives_pytorchs_outputs(make_cfg, tmp_path, model):
    compressed, shape = compressed_model(make_cfg, model, "prune+svd")
    model_file.keep_compressed(compressed, inference_model(compressed), shape, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model_compressed.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(5, *shape)  # exported at batch 2: the batch dimension is dynamic
    with torch.no_grad():
        expected = compressed(x)
    (got,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "model_compressed.pt").is_file()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_run_keeps_its_files_and_export_writes_each_format(make_cfg, tmp_path, monkeypatch,
                                                              capsys):
    run = tmp_path / "run"
    train(make_cfg("data=synthetic", "compress.rank=2", "compress.target=null",
                   "bench.latency=false"))
    assert {"model_dense.pt2", "model_compressed.pt2", "model_compressed.pt",
            "model_compressed.onnx"} <= {p.name for p in run.iterdir()}
    loaded = compaware.load_model(run / "model_compressed.pt")
    finetuned = checkpoint.load(run / "checkpoints" / "finetune.pt")["model"]
    assert loaded.state_dict().keys() == finetuned.keys()
    assert all(torch.equal(loaded.state_dict()[k], finetuned[k]) for k in finetuned)

    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = loaded(x)
    readers = {"onnx": lambda p: ort.InferenceSession(str(p)).run(None, {"input": x.numpy()})[0],
               "torchscript": lambda p: torch.jit.load(str(p))(x),
               "pt2": lambda p: torch.export.load(str(p)).module()(x)}
    for form, read in readers.items():
        out = tmp_path / f"again.{form}"
        assert export_cli.main([str(run), "--format", form, "--out", str(out)]) == 0
        with torch.no_grad():
            torch.testing.assert_close(torch.as_tensor(read(out)), expected, atol=1e-4,
                                       rtol=1e-4)
    monkeypatch.setattr(sys, "argv", ["compaware", "export", str(run), "--format", "onnx"])
    with pytest.raises(SystemExit) as done:  # the console script's dispatch
        cli.main()
    assert done.value.code == 0
    assert f"wrote {run / 'model_compressed.onnx'}" in capsys.readouterr().out


def test_without_onnx_the_run_logs_why_and_writes_the_rest(monkeypatch, tmp_path, caplog):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with caplog.at_level(logging.INFO):
        model_file.keep_compressed(model, model, (1, 2, 2), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model_compressed.pt"]
    (line,) = [r for r in caplog.records if "model_compressed.onnx" in r.getMessage()]
    assert "needs the onnx package" in line.getMessage() and line.levelno == logging.INFO


def test_a_model_onnx_cannot_express_is_skipped_with_a_warning(tmp_path, caplog):
    # an adaptive pool whose output size does not divide its input (AlexNet at 112 px)
    with caplog.at_level(logging.WARNING):
        assert keep_onnx(nn.AdaptiveAvgPool2d(3), torch.zeros(2, 1, 4, 4),
                         tmp_path / "m.onnx") is None
    assert not (tmp_path / "m.onnx").exists()
    assert "cannot be exported to ONNX" in caplog.text


class OwnNet(nn.Sequential):
    """A model class outside torch.nn, torchvision and compaware."""


class Payload:
    """Unpickles as a call to ``os.system``: what a malicious model file would hold."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_file(path, module: object, version: int = model_file.VERSION) -> None:
    """A model file holding ``module``'s pickle, as :func:`model_file.save_model` lays it out."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    checkpoint.save({"format": model_file.FORMAT, "version": version, "input_shape": [4],
                     "module": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)},
                    path)


def test_a_class_from_elsewhere_loads_only_when_passed(tmp_path):
    write_file(tmp_path / "own.pt", OwnNet(nn.Linear(4, 2)))
    with pytest.raises(UserError, match=r"names tests\.test_deploy_files\.OwnNet: .*"
                                        r"classes=\[OwnNet\]"):
        compaware.load_model(tmp_path / "own.pt")
    assert isinstance(compaware.load_model(tmp_path / "own.pt", classes=[OwnNet]), OwnNet)


def test_a_file_that_would_run_code_is_refused_before_running_it(tmp_path):
    marker = tmp_path / "ran"
    write_file(tmp_path / "evil.pt", Payload(str(marker)))
    with pytest.raises(UserError, match=r"names posix\.system: not module classes"):
        compaware.load_model(tmp_path / "evil.pt")
    assert not marker.exists()
    # a torch.fx module is rebuilt by running its generated Python code: refused too
    write_file(tmp_path / "fx.pt", torch.fx.symbolic_trace(nn.Linear(4, 2)))
    with pytest.raises(UserError, match=r"names torch\.fx\._symbolic_trace\.Tracer, "
                                        r"torch\.fx\.graph_module\.reduce_graph_module:"):
        compaware.load_model(tmp_path / "fx.pt")


def test_damaged_foreign_and_future_files_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    model_file.save_model(model, (4,), tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    (tmp_path / "cut.pt").write_bytes(bytes(data[:100]))
    checkpoint.save({"model": model.state_dict()}, tmp_path / "finetune.pt")
    write_file(tmp_path / "future.pt", model, version=model_file.VERSION + 1)
    for name, message in [("flipped.pt", "is damaged|cannot be loaded"),
                          ("cut.pt", "cannot be loaded"),
                          ("finetune.pt", "not a model file written by a run"),
                          ("future.pt", "format version 2; this compaware reads version 1"),
                          ("absent.pt", "does not exist")]:
        with pytest.raises(UserError, match=message):
            compaware.load_model(tmp_path / name)


def test_export_errors_are_one_paragraph(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_compressed.pt").write_bytes(b"not a model")
    old = tmp_path / "old"
    old.mkdir()
    cases = [([str(tmp_path / "nowhere"), "--format", "onnx"], "is not a directory"),
             ([str(old), "--format", "onnx"], "has no model_compressed.pt"),
             ([str(run), "--format", "tflite"], "'tflite' is not an export format; the "
                                                "formats are onnx, torchscript, pt2"),
             ([str(run), "--format", "pt2"], "is not a readable compaware model file")]
    for argv, message in cases:
        assert export_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_import_compaware_stays_light():
    out = subprocess.run([sys.executable, "-c", "import sys, compaware; "
                          "assert callable(compaware.load_model); "
                          "assert 'torch' not in sys.modules"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

