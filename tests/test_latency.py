"""Latency-aware compression: a step kept only where the clock (a fake one, or a
:class:`~compaware.deploy.timing.LayerTimer` under ONNX Runtime or Inductor) says it is
faster; the timer handed in from outside, required when latency-aware, and its answers
recorded and replayed for a resumed run (the run itself: tests/test_faults.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from compaware.compress import SVD, Prune, PruneSVD, ShapeDepth
from compaware.compress.latency import LatencyCheck
from compaware.compress.replay import RecordingTimer, ReplayingTimer, question
from compaware.config import UserError
from compaware.deploy import timing
from compaware.deploy.timing import LayerTimer
from compaware.models.lenet import LeNet5


class FakeClock:
    """Seconds = parameters of the layer, × ``factor`` where ``slow(layer)``: what a real CPU
    does to a factorized pair or an odd width, caricatured. Counts its calls."""

    def __init__(self, slow, factor: float) -> None:
        self.slow, self.factor, self.calls = slow, factor, 0

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> float:
        self.calls += 1
        size = sum(p.numel() for p in layer.parameters())
        return size * (self.factor if self.slow(layer) else 1)


def test_latency_aware_svd_keeps_a_factorization_only_where_it_is_faster():
    torch.manual_seed(0)
    svd = SVD(rank=4, latency_aware=True, input_shape=(1, 28, 28), latency_batch=2)
    clock = FakeClock(lambda layer: isinstance(layer, nn.Sequential), 20)
    compressed, report = svd(LeNet5(), timer=clock)
    # fc1: 400,500 parameters → a pair of 5,700, still faster at 20×; conv2 (25,050 → 2,250),
    # conv1 (520 → 200) and fc2 (5,010 → 2,050) are not
    assert report["fc1"]["factorized"] and isinstance(compressed.fc1, nn.Sequential)
    for name in ("conv1", "conv2", "fc2"):
        assert report[name]["reason"] == "not faster when timed"
        assert not isinstance(getattr(compressed, name), nn.Sequential)
    assert report["fc1"]["latency_ms"]["factorized"] < report["fc1"]["latency_ms"]["layer"]
    assert clock.calls == 2 * 4 * LatencyCheck.rounds  # each layer and its pair, per round


def test_latency_aware_prune_keeps_a_group_only_where_it_is_faster():
    torch.manual_seed(0)
    odd = FakeClock(lambda layer: layer.weight.shape[0] % 2 == 1, 1000)
    # conv2 50 → 25 units is an odd width: slower on this clock, so conv2 stays whole
    prune = Prune(ratio=0.5, latency_aware=True, latency_batch=2)
    pruned, report = prune(LeNet5(), timer=odd)
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels) == (10, 50)
    assert report["conv2"]["reason"] == "not faster when timed"
    assert pruned.fc1.out_features == 250
    timed = report["fc1"]["latency_ms"]
    assert timed["pruned"] < timed["layers"]
    # rounded to multiples of 8, every width is even: every pruning step is kept
    prune = Prune(ratio=0.5, latency_aware=True, latency_batch=2, round_to=8)
    pruned, _ = prune(LeNet5(), timer=odd)
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels) == (16, 32)


def test_latency_aware_needs_an_input_shape():
    with pytest.raises(UserError, match="compress.input_shape"):
        SVD(latency_aware=True)
    with pytest.raises(UserError, match="compress.round_to"):
        SVD(round_to=0)


def test_latency_form_takes_eager_channels_last_onnxruntime_or_inductor(monkeypatch):
    with pytest.raises(UserError, match="compress.latency_form='tensorrt'.*eager, channels_last, "
                                        "onnxruntime, inductor"):
        SVD(latency_form="tensorrt")
    conv, x = nn.Conv2d(8, 8, 3), torch.randn(4, 8, 16, 16)
    for form in ("channels_last", "eager"):
        assert LayerTimer(form, min_run_time=0.01)(conv, x) > 0
    assert conv.weight.is_contiguous()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else
                        find_spec(name, *args))
    with pytest.raises(UserError, match="onnxruntime is not installed"):
        Prune(0.5, latency_aware=True, latency_form="onnxruntime")
    Prune(0.5, latency_form="onnxruntime")  # not latency-aware: nothing is timed


@pytest.mark.parametrize("form, builder", [("onnxruntime", "onnxruntime_forward"),
                                           ("inductor", "compile_inductor")])
def test_a_deployed_layer_timer_builds_a_layer_once_per_shape(monkeypatch, form, builder):
    if form == "onnxruntime":
        pytest.importorskip("onnxruntime")
    built = []

    def counted(layer, x, *args):
        built.append((tuple(layer.weight.shape), x.is_contiguous()))
        return build(layer, x, *args)

    build = getattr(timing, builder)
    monkeypatch.setattr(timing, builder, counted)
    timer = LayerTimer(form, min_run_time=0.01)
    layer, x = nn.Linear(64, 32), torch.randn(8, 64)
    assert timer(layer, x) > 0 and timer(layer, x) > 0
    assert built == [((32, 64), True)]
    layer.weight = nn.Parameter(layer.weight[:16].detach())  # narrowed in place, as pruned
    layer.bias = nn.Parameter(layer.bias[:16].detach())
    assert timer(layer, x) > 0
    assert built == [((32, 64), True), ((16, 64), True)]
    conv = nn.Conv2d(3, 4, 3)  # Inductor keeps a compiled network's activations NHWC
    assert timer(conv, torch.randn(2, 3, 8, 8)) > 0
    assert built[-1] == ((4, 3, 3, 3), form != "inductor")


@pytest.mark.parametrize("form", ["onnxruntime", pytest.param("inductor", marks=pytest.mark.slow)])
def test_latency_aware_svd_times_layers_in_a_deployment_form(form):
    if form == "onnxruntime":
        pytest.importorskip("onnxruntime")
    svd = SVD(rank=4, latency_aware=True, input_shape=(1, 28, 28), latency_batch=4,
              latency_form=form)
    compressed, report = svd(LeNet5(), timer=LayerTimer(form, min_run_time=0.01))
    for name, entry in report.items():  # real clock: each decision follows its own timing
        timed = entry["latency_ms"]
        assert timed["layer"] > 0 and timed["factorized"] > 0
        faster = timed["factorized"] < timed["layer"]
        assert entry["factorized"] == faster
        assert isinstance(getattr(compressed, name), nn.Sequential) == faster


@pytest.mark.parametrize("make", [
    lambda: SVD(rank=4, latency_aware=True, input_shape=(1, 28, 28)),
    lambda: Prune(0.5, latency_aware=True, input_shape=(1, 28, 28)),
    lambda: PruneSVD(0.5, latency_aware=True, input_shape=(1, 28, 28)),
    lambda: ShapeDepth(latency_aware=True, input_shape=(1, 28, 28))])
def test_a_latency_aware_compressor_without_a_timer_stops_with_a_clear_error(make):
    with pytest.raises(UserError, match="latency-aware .* but was given no timer.*LayerTimer"):
        make()(LeNet5())


def test_a_compressor_that_times_nothing_needs_no_timer_and_ignores_one():
    clock = FakeClock(lambda layer: False, 1)
    for compressor in (SVD(rank=4), Prune(0.5), PruneSVD(0.5), ShapeDepth()):
        assert not compressor.latency_aware
        compressor(LeNet5())
        compressor(LeNet5(), timer=clock)
    assert clock.calls == 0


def test_prune_svd_times_both_steps_with_the_timer_it_is_handed():
    torch.manual_seed(0)
    clock = FakeClock(lambda layer: isinstance(layer, nn.Sequential), 20)
    compressed, report = PruneSVD(0.5, rank=4, latency_aware=True, latency_batch=2,
                                  input_shape=(1, 28, 28))(LeNet5(), timer=clock)
    assert "pruned" in report["conv1"]["latency_ms"]  # Prune's timing
    assert "factorized" in report["fc1"]["latency_ms"]  # SVD's
    assert isinstance(compressed.fc1, nn.Sequential)
    assert not isinstance(compressed.conv2, nn.Sequential)


def test_replayed_timings_rebuild_the_recorded_architecture_whatever_the_clock_says_now(
        tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    svd = SVD(rank=4, latency_aware=True, input_shape=(1, 28, 28), latency_batch=2)
    recorder = RecordingTimer(FakeClock(lambda layer: isinstance(layer, nn.Sequential), 20))
    first, report = svd(model, timer=recorder)
    assert len(recorder.answers) == 2 * 4 * LatencyCheck.rounds
    assert recorder.answers[0]["question"] == "Conv2d(20×1×5×5, 20) on 2×1×28×28"
    # a clock that now finds every pair faster would factorize every layer
    anew, _ = svd(model, timer=FakeClock(lambda layer: False, 1))
    assert isinstance(anew.conv2, nn.Sequential)
    assert_replayed(svd, model, recorder, (first, report), tmp_path)


def assert_replayed(compress, model: nn.Module, recorder: RecordingTimer, recorded: tuple,
                    folder) -> None:
    """``compress`` of ``model`` replaying ``recorder``'s answers asks every recorded
    question and gives the ``recorded`` architecture and report again."""
    replay = ReplayingTimer(recorder.answers, folder / "compression.json")
    again, replayed = compress(model, timer=replay)
    replay.check_all_asked()
    first, report = recorded
    assert replayed == report
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in first.state_dict().items()}


def test_a_replay_of_another_compression_stops_naming_the_record(tmp_path):
    conv, x = nn.Conv2d(1, 4, 3), torch.zeros(2, 1, 8, 8)
    assert question(conv, x) == "Conv2d(4×1×3×3, 4) on 2×1×8×8"
    replay = ReplayingTimer([{"question": question(conv, x), "seconds": 1.0}],
                            tmp_path / "compression.json")
    with pytest.raises(UserError, match="compression.json.*timing 1 asks for Linear"):
        replay(nn.Linear(3, 2), torch.zeros(2, 3))
    assert replay(conv, x) == 1.0
    replay.check_all_asked()
    with pytest.raises(UserError, match="timing 2 asks for .* the record has nothing more"):
        replay(conv, x)
    short = ReplayingTimer([{"question": question(conv, x), "seconds": 1.0}] * 2, tmp_path)
    short(conv, x)
    with pytest.raises(UserError, match="asked 1 of its 2 timings"):
        short.check_all_asked()
