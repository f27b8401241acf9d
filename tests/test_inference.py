"""The inference path: BatchNorm folding keeps the outputs, ranks and widths round to
multiples, and the NHWC copies, TorchScript, Inductor and ONNX exports compute what the model
computes (latency-aware compression: tests/test_latency.py)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from compaware.compress import SVD, Prune
from compaware.compress.latency import round_up
from compaware.compress.shape import LiveColumnConv2d
from compaware.config import UserError
from compaware.deploy import bench
from compaware.deploy.bench import (
    channels_last_forward,
    fastest_latency,
    form_latency,
    inference_model,
    strided_pools_model,
)
from compaware.deploy.export import (
    INDUCTOR_CONVS,
    compile_inductor,
    export_onnx,
    freeze_torchscript,
)
from compaware.deploy.fold import fold_batchnorm
from compaware.models.lenet import LeNet5
from tests.test_prune import _resnet, randomize_norms


class SharedOutput(nn.Module):
    """A conv whose output feeds a BatchNorm *and* the residual sum: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_folding_batchnorm_keeps_the_outputs():
    model = _resnet().eval()
    folded, count = fold_batchnorm(model)
    assert count == 20  # every BatchNorm of ResNet-18 follows its conv alone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # a copy was folded


def test_a_batchnorm_sharing_its_input_is_not_folded():
    model = randomize_norms(SharedOutput()).eval()
    folded, count = fold_batchnorm(model)
    assert count == 0
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x))


def test_rounding_to_hardware_friendly_multiples():
    assert [round_up(n, 8, 50) for n in (1, 8, 9, 47, 49)] == [8, 8, 16, 48, 50]
    torch.manual_seed(0)
    model = LeNet5()
    compressed, report = SVD(rank=3, round_to=8)(model)
    assert {name: entry["rank"] for name, entry in report.items()} == dict.fromkeys(
        ("conv1", "conv2", "fc1", "fc2"), 8)
    assert compressed.fc1[0].out_features == 8
    _, report = SVD(rank=9, round_to=8)(model)
    assert report["conv1"]["rank"] == 16 and report["fc2"]["rank"] == 10  # at most full rank
    pruned, report = Prune(ratio=0.5, round_to=8)(model)
    assert pruned.conv1.out_channels == 16  # 20 − 10 = 10 kept, rounded up to 16
    assert pruned.conv2.out_channels == 32 and pruned.fc1.out_features == 256


def test_channels_last_forward_computes_what_the_model_computes():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    live = LiveColumnConv2d(conv, torch.tensor([0, 4, 9, 13, 26]))  # compress=ssl's layer
    x = torch.randn(2, 1, 32, 32)
    for model, batch in ((fold_batchnorm(_resnet())[0], x), (LeNet5(1, 10, 32).eval(), x),
                         (SVD(energy=0.5)(LeNet5(1, 10, 32))[0].eval(), x),
                         (live, torch.randn(2, 3, 9, 9))):
        forward = channels_last_forward(model)
        with torch.no_grad():
            torch.testing.assert_close(forward(batch), model(batch), atol=1e-5, rtol=1e-4)
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(w.is_contiguous() for w in convs)  # timed on a copy: the model is as it was
    timed = form_latency("channels_last", {"lenet5": inference_model(LeNet5())}, (1, 28, 28),
                         batch_size=2, min_run_time=0.01, threads=1)  # bench.forms=[channels_last]
    assert timed["device"] == "cpu" and timed["batch_1"]["lenet5"] > 0


def test_the_fastest_choice_keeps_each_models_fastest_form_per_batch_size(monkeypatch):
    def fake_ms(forward, batch, min_run_time, threads):  # NCHW faster at batch 1, NHWC at 4
        in_nchw = isinstance(forward, nn.Module)  # NHWC: channels_last_forward's function
        return 1.0 if in_nchw == (len(batch) == 1) else 2.0
    monkeypatch.setattr(bench, "median_ms", fake_ms)
    models = {"dense": inference_model(LeNet5()), "compressed": inference_model(LeNet5())}
    timed = {form: form_latency(form, models, (1, 28, 28), batch_size=4, min_run_time=0.01,
                                threads=1)
             for form in ("eager", "channels_last")}  # bench.fastest=true
    timed["onnxruntime"] = None  # a form that could not be built is left out of the choice
    fastest = fastest_latency(timed)
    assert fastest["forms"] == {"batch_1": {"dense": "eager", "compressed": "eager"},
                                "batch_N": {"dense": "channels_last",
                                            "compressed": "channels_last"}}
    assert fastest["batch_1"] == fastest["batch_N"] == {"dense": 1.0, "compressed": 1.0}
    assert fastest_latency({"eager": None}) is None


def test_torchscript_and_onnx_exports_compute_what_the_model_computes(tmp_path):
    model = strided_pools_model(inference_model(_resnet()))  # BN folded, its max-pool swapped
    x = torch.randn(3, 1, 32, 32)
    expected = model(x)
    torch.testing.assert_close(freeze_torchscript(model, x[:1])(x), expected,
                               atol=1e-4, rtol=1e-4)
    pytest.importorskip("onnx")  # the optional extra compaware[onnx]
    assert export_onnx(model, x[:1], tmp_path / "m.onnx") > 0
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": x.numpy()})  # batch size 3: dynamic
    torch.testing.assert_close(torch.from_numpy(output), expected, atol=1e-4, rtol=1e-4)


def test_a_model_onnx_cannot_export_stops_with_a_clear_error_and_no_graph_dump(tmp_path, capfd):
    pytest.importorskip("onnx")
    pooled_up = nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(6))  # 3×3 → 6×6
    with pytest.raises(UserError, match="cannot be exported to ONNX"):
        export_onnx(pooled_up, torch.randn(1, 1, 3, 3), tmp_path / "m.onnx")
    print("after")  # the process's stdout is back
    out = capfd.readouterr().out
    assert "graph" not in out and out == "after\n"


def test_the_inductor_form_computes_what_the_pruned_model_computes_at_its_batch_size():
    model = inference_model(Prune(0.5, input_shape=(1, 32, 32))(_resnet())[0])
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        compiled = compile_inductor(model, x)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="expected size 1==2"):  # not recompiled
            compiled(x[:1])


def test_inductor_can_leave_the_convs_to_pytorchs_own_dispatch():
    """convs="aten" keeps PyTorch's conv op in the compiled code (oneDNN's prepacked op, the
    default, does not show in the profile of C++-launched code), with the same outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    ran = {}
    with torch.inference_mode():
        for convs in INDUCTOR_CONVS:
            compiled = compile_inductor(model, x, convs)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
            with torch.profiler.profile() as profile:
                compiled(x)
            ran[convs] = {event.key for event in profile.key_averages()}
    assert "aten::_convolution" in ran["aten"]
    assert "aten::_convolution" not in ran["onednn"]
    with pytest.raises(ValueError, match="convs='mkl': this process compiles convs with "
                                         "onednn or aten"):
        compile_inductor(model, x, "mkl")


def _compiled_modules() -> int:
    """How many namespaces of Inductor's compiled Python modules (where the frozen weights
    are) are alive in this process."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, dict) and str(o.get(
        "__name__")).startswith("torch._inductor.runtime.compile_tasks."))


def test_a_compiled_model_lives_only_as_long_as_its_callable():
    """Inductor registers each compile's module (holding the frozen weights) process-wide;
    compile_inductor drops those references, so a benchmark compiling many models does not
    keep every one of them in memory, and the callables it keeps still run."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    before = _compiled_modules()
    with torch.inference_mode():
        kept, dropped = compile_inductor(model, x), compile_inductor(model, x)
        assert _compiled_modules() == before + 2
        del dropped
        assert _compiled_modules() == before + 1
        torch.testing.assert_close(kept(x), model(x), atol=1e-5, rtol=1e-4)
        del kept
    assert _compiled_modules() == before


@pytest.mark.parametrize("padding", [0, 1])
def test_the_live_column_layer_gathers_from_one_copy_with_a_zero_not_a_pad(padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=padding)
    layer = LiveColumnConv2d(conv, torch.tensor([0, 4, 9, 13, 26]))
    x = torch.randn(2, 3, 9, 9)
    graph = torch.export.export(nn.Sequential(nn.ReLU(), layer), (x,)).graph
    # TorchInductor fuses a pad into the gather as arithmetic on every index, and the ReLU
    # too, recomputed for every read, unless a copy (the concatenation) comes between
    gather = next(n for n in graph.nodes if n.target == torch.ops.aten.gather.default)
    assert gather.args[0].target == torch.ops.aten.cat.default
    assert not [n for n in graph.nodes if "pad" in str(n.target)]
    with torch.inference_mode():
        torch.testing.assert_close(compile_inductor(layer, x)(x), layer(x), atol=1e-5,
                                   rtol=1e-4)


class ValueDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_a_model_inductor_cannot_compile_stops_with_a_clear_error():
    with pytest.raises(UserError, match="cannot be compiled by TorchInductor: fails"):
        compile_inductor(nn.Sequential(nn.Linear(4, 4), ValueDependent()), torch.randn(2, 4))
