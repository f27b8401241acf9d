"""Latency budgets (``compress.target=latency:<share>``): planned with measured layer prices,
checked by timing the whole models side by side, re-planned when the check misses (a bounded
number of times), each layer shape timed once, and exactly replayed on resume. A fake clock
(seconds = MACs) makes every decision deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compaware.compress import SVD, Prune, PruneSVD
from compaware.compress.budget import TOLERANCE
from compaware.compress.latency_budget import (
    CLOSE,
    INSIDE,
    PLANS,
    ROUNDS,
    Curve,
    next_aim,
)
from compaware.compress.replay import RecordingTimer, question
from compaware.compress.svd import Spectrum, rank_steps
from compaware.config import UserError
from compaware.costs import count_macs
from compaware.deploy.timing import LayerTimer
from compaware.layers import weight_layers
from compaware.models.cifar import CifarResNet
from compaware.models.lenet import LeNet5
from tests.test_latency import assert_replayed

WHOLE = (LeNet5, CifarResNet)
MACS: dict[str, int] = {}  # counted once per question: the counter runs a forward pass


class MacClock:
    """Seconds = MACs of the module on one sample of ``x``, a nanosecond each. Whole models
    other than the first one timed (the dense model) take ``penalty`` times as long as their
    MACs say: what a real model's memory traffic and kernel launches do to a plan made from
    its layers alone. Counts the layer timings and the whole-model ones."""

    def __init__(self, penalty: float = 1.0) -> None:
        self.penalty, self.dense = penalty, None
        self.layers: list[str] = []
        self.wholes = 0

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        asked = question(module, x) + repr(module)
        if asked not in MACS:
            MACS[asked] = count_macs(module, tuple(x.shape[1:]))
        seconds = MACS[asked] * 1e-9
        if not isinstance(module, WHOLE):
            self.layers.append(asked)
            return seconds
        self.wholes += 1
        self.dense = self.dense or module
        return seconds * (1 if module is self.dense else self.penalty)


def macs_share(model: nn.Module, compressed: nn.Module, shape: tuple[int, ...]) -> float:
    return count_macs(compressed, shape) / count_macs(model, shape)


@pytest.mark.parametrize("method", [SVD, Prune])
@pytest.mark.parametrize("share", [0.5, 0.33])
def test_a_latency_budget_is_met_as_measured(method, share):
    torch.manual_seed(0)
    model, clock = LeNet5(), MacClock()
    compressed, report = method(target=f"latency:{share}", input_shape=(1, 28, 28),
                                latency_batch=2)(model, timer=clock)
    budget = report["budget"]
    achieved = macs_share(model, compressed, (1, 28, 28))  # what this clock measures
    assert budget["achieved"] == pytest.approx(achieved, abs=1e-4)
    assert share * (1 - 2 * TOLERANCE) <= achieved <= share * (1 + TOLERANCE)
    assert budget == {"kind": "latency", "target": share, "achieved": budget["achieved"],
                      "spread": 0.0, "planned": budget["planned"], "plans": 1, "reached": True}
    # the dense model once, then each round of the check times dense and compressed
    assert clock.wholes == 1 + 2 * ROUNDS


def pruned_to_half(penalty: float) -> tuple[nn.Module, nn.Module, dict, MacClock]:
    """LeNet-5 pruned to latency:0.5 under a clock that times every model ``penalty`` × its
    MACs share: the dense model, the compressed one, the budget entry and the clock."""
    torch.manual_seed(0)
    model, clock = LeNet5(), MacClock(penalty=penalty)
    compressed, report = Prune(target="latency:0.5", input_shape=(1, 28, 28), latency_batch=2,
                               round_to=2)(model, timer=clock)
    return model, compressed, report["budget"], clock


def test_a_plan_that_measures_slower_than_planned_is_aimed_lower_and_made_again():
    model, compressed, budget, clock = pruned_to_half(1.2)
    assert budget["plans"] == 2 and budget["reached"]
    assert budget["achieved"] <= 0.5 * (1 + TOLERANCE)
    assert budget["planned"] < 0.45  # aimed at 0.5 · 0.5 / 0.6 the second time
    assert budget["achieved"] == pytest.approx(1.2 * macs_share(model, compressed, (1, 28, 28)),
                                               abs=1e-4)
    assert clock.wholes == 1 + 2 * 2 * ROUNDS


def test_a_plan_that_measures_much_faster_than_planned_is_made_again_less_compressed():
    _, _, budget, _ = pruned_to_half(0.7)
    assert budget["plans"] == 2 and budget["reached"]
    assert 0.5 * (1 - CLOSE) <= budget["achieved"] <= 0.5 * (1 + TOLERANCE)
    assert budget["planned"] > 0.65  # aimed at 0.5 · 0.5 / 0.35 the second time


class PassesClock(MacClock):
    """A whole model also takes ``per_output`` ns per element its convs and linears write
    (the ReLUs and pools over their outputs, which no layer timed alone accounts for)."""

    def __init__(self, per_output: float) -> None:
        super().__init__()
        self.per_output = per_output

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        seconds = super().__call__(module, x)
        if not isinstance(module, WHOLE):
            return seconds
        written = []
        hooks = [layer.register_forward_hook(lambda _, __, out: written.append(out[0].numel()))
                 for _, layer in weight_layers(module)]
        with torch.no_grad():
            module(x[:1])
        for hook in hooks:
            hook.remove()
        return seconds + self.per_output * sum(written) * 1e-9


def test_the_passes_between_layers_shrink_with_a_pruned_models_channels():
    torch.manual_seed(0)
    model = LeNet5()
    compressed, report = Prune(target="latency:0.5", input_shape=(1, 28, 28), latency_batch=2)(
        model, timer=PassesClock(per_output=30))
    budget = report["budget"]
    assert budget["plans"] == 1 and budget["reached"]  # planned right the first time
    assert budget["achieved"] == pytest.approx(budget["planned"], abs=0.02)


def test_a_budget_the_clock_never_confirms_stops_after_a_few_plans_with_the_reason():
    torch.manual_seed(0)
    compressed, report = SVD(target="latency:0.5", input_shape=(1, 28, 28), latency_batch=2)(
        LeNet5(), timer=MacClock(penalty=100))
    budget = report["budget"]
    assert budget["plans"] == PLANS and not budget["reached"]
    assert any(why in budget["reason"] for why in (f"{PLANS} plans", "smallest rank",
                                                    "compress.max_layer_cut"))


def test_each_layer_shape_is_timed_once_however_often_it_repeats_or_is_replanned():
    torch.manual_seed(0)
    clock = MacClock(penalty=1.3)
    Prune(target="latency:0.5", input_shape=(3, 32, 32), latency_batch=2,
          round_to=4)(CifarResNet(3), timer=clock)
    assert len(clock.layers) == len(set(clock.layers))
    # ResNet-20's 19 convs and its linear come in far fewer shapes, each timed dense and at
    # the sizes of FRACTIONS at most
    assert len(clock.layers) < 5 * 20


def test_a_latency_budget_is_replayed_exactly_on_resume(tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    prune = Prune(target="latency:0.5", input_shape=(1, 28, 28), latency_batch=2)
    recorder = RecordingTimer(MacClock(penalty=1.2))
    first, report = prune(model, timer=recorder)
    assert any(answer["question"].startswith("LeNet5(") for answer in recorder.answers)
    assert_replayed(prune, model, recorder, (first, report), tmp_path)


def test_a_latency_budget_needs_a_timer_and_is_not_split_by_prune_svd():
    svd = SVD(target="latency:0.5", input_shape=(1, 28, 28))
    assert svd.latency_aware and not svd.latency.check_layers
    with pytest.raises(UserError, match="no timer"):
        svd(LeNet5())
    with pytest.raises(UserError, match="latency budget.*compress=svd and compress=prune"):
        PruneSVD(target="latency:0.5", input_shape=(1, 28, 28))


def test_the_next_plan_is_aimed_between_two_that_missed_on_either_side():
    assert next_aim([(0.6, 0.5)], 0.5, 0.5) == pytest.approx(0.5 * 0.5 / 0.6)
    assert next_aim([(0.3, 0.5)], 0.5, 0.5) == pytest.approx(0.5 * 0.5 / 0.3)
    assert next_aim([(0.2, 0.5), (0.6, 0.9)], 0.5, 0.8) == pytest.approx(0.5 + 0.3 * 0.4 / 0.4)
    # noise measured the larger of two slower aims faster: the bracket is the closest aims
    tried = [(0.268, 0.33), (0.383, 0.407), (0.391, 0.371)]  # ResNet-50, 224 px, latency:0.33
    assert next_aim(tried, 0.33, 0.371) == pytest.approx(0.33 + 0.062 * 0.041 / 0.123)


def test_an_aim_stays_inside_the_bracket_of_the_plans_measured():
    """A plan measured 10× faster than predicted would be corrected to an aim of 5: it stops
    10 % of the way short of the dense model (aim 1, measured 1)."""
    assert next_aim([(0.05, 0.5)], 0.5, 0.5) == pytest.approx(1 - INSIDE * 0.5)
    # an interpolation hugging one end of its bracket is pushed 10 % inside it
    assert next_aim([(0.3, 0.5), (0.52, 0.9)], 0.5, 0.9) == pytest.approx(0.9 - INSIDE * 0.4)
    # a plan measured 20× slower than the target is corrected no lower than 10 % of its aim
    assert next_aim([(10.0, 0.5)], 0.5, 0.5) == pytest.approx(INSIDE * 0.5)


class CurvedClock(MacClock):
    """A compressed model takes its MACs share cubed of the dense model's time: its layers,
    timed alone, predict far too little of the saving (small layers cost more alone)."""

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        seconds = super().__call__(module, x)
        if not isinstance(module, WHOLE) or module is self.dense:
            return seconds
        dense = MACS[question(self.dense, x) + repr(self.dense)] * 1e-9
        return dense * (seconds / dense) ** 3


def test_a_plan_measured_many_times_faster_is_searched_back_to_the_target():
    torch.manual_seed(0)
    model = LeNet5()
    compressed, report = Prune(target="latency:0.5", input_shape=(1, 28, 28), latency_batch=2,
                               round_to=2)(model, timer=CurvedClock())
    budget = report["budget"]
    assert budget["reached"] and budget["plans"] > 1
    assert 0.5 * (1 - CLOSE) <= budget["achieved"] <= 0.5 * (1 + TOLERANCE)
    assert macs_share(model, compressed, (1, 28, 28)) > 0.7  # not the first, 8× faster plan


def test_a_curve_interpolates_between_its_measurements_and_holds_beyond_them():
    curve = Curve({1.0: 10.0, 0.5: 6.0, 0.25: 5.0})
    assert [curve(x) for x in (2.0, 1.0, 0.75, 0.5, 0.375, 0.1)] == [10, 10, 8, 6, 5.5, 5]


def test_a_rank_that_saves_no_time_is_skipped_not_taken_at_a_loss():
    times = {16: 100, 12: 120, 8: 90, 4: 50}  # the pair at rank 12 is slower than the layer
    spectrum = Spectrum(torch.linspace(16, 1, 16), 32, 32, 0, timed=times.get)
    steps = rank_steps("layer", spectrum, round_to=4, threshold=0)
    assert [(rank, saved) for _, _, rank, saved in steps] == [(8, 10), (4, 40)]


def test_the_layer_timer_times_a_whole_model_folded_as_the_benchmark_runs_it():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    timer = LayerTimer("eager", min_run_time=0.01)
    assert timer(model, torch.randn(2, 1, 8, 8)) > 0
    (shapes, folded), = timer.deployed.values()
    assert isinstance(folded[1], nn.Identity) and isinstance(model[1], nn.BatchNorm2d)


def test_a_run_records_the_measured_budget_and_its_timings(make_cfg, tmp_path, monkeypatch,
                                                           capsys):
    import compaware.train as train_module
    monkeypatch.setattr(train_module, "LayerTimer", lambda form: MacClock(penalty=1.2))
    train_module.train(make_cfg("model=lenet5", "compress=prune", "compress.target=latency:0.5",
                                "compress.latency_batch=2", "bench.latency=false"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    budget = results["compression"]["details"]["budget"]
    assert budget["kind"] == "latency" and budget["reached"] and budget["plans"] == 2
    timings = json.loads((tmp_path / "run" / "checkpoints" / "compression.json").read_text())
    wholes = [t for t in timings["timings"] if t["question"].startswith("LeNet5(")]
    assert len(wholes) == 1 + 2 * 2 * ROUNDS  # replayed on resume like every other timing
    assert f"budget: latency 0.5 asked, {budget['achieved']:.3g} reached" in (
        capsys.readouterr().out)
