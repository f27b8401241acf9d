"""Training toward a budget (compaware/steering.py): which pairs steer, the controller's
direction and brake, what a run records, and a resumed run steering exactly as an
undisturbed one."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from compaware.compress import SVD, Prune, PruneSVD
from compaware.config import CONF_DIR, UserError, validate
from compaware.models.lenet import LeNet5
from compaware.regularizers import L1, SGL, LowRank, LowRankSGL, Regularizer, SoftWeightSharing
from compaware.steering import MARGIN, MAX_STEP, Steering, steering_for, zeros_only
from compaware.train import train
from tests.test_faults import assert_same_run, run_killed

SHAPE = (1, 28, 28)
pytestmark = pytest.mark.usefixtures("one_thread")


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return LeNet5()


def steering(share: float = 0.5, *, regularizer: Regularizer | None = None,
             compressor=SVD, epochs: int = 4, ramp: float = 0.5) -> Steering:
    model = lenet()
    return steering_for(regularizer or LowRank(0.1), compressor(target=f"macs:{share}",
                                                               input_shape=SHAPE),
                        model, epochs=epochs, ramp=ramp)


class Writer:
    """A SummaryWriter that keeps the scalars."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = value


def test_the_target_falls_from_dense_to_just_below_the_budget_over_the_ramp():
    controller = steering(0.25, epochs=10, ramp=0.5)
    targets = [controller.target(done) for done in range(11)]
    assert targets[0] == 1.0 and controller.ramp_epochs == 5
    assert all(a > b for a, b in zip(targets[:5], targets[1:6], strict=True))
    assert targets[5:] == [pytest.approx(0.25 * (1 - MARGIN))] * 6


@pytest.mark.parametrize(("regularizer", "compressor", "why"), [
    (Regularizer(), SVD, "leaves no structure"),
    (L1(0.1), Prune, "leaves no structure"),
    (SoftWeightSharing(), SVD, "leaves no structure"),
    (LowRank(0.1), Prune, "which Prune does not remove"),
    (SGL(0.01), SVD, "which SVD does not remove"),
    (LowRank(0.0), SVD, "regularizer.lam=0"),
])
def test_a_pair_that_cannot_steer_trains_plainly_and_says_so_once(regularizer, compressor, why,
                                                                   caplog):
    with caplog.at_level(logging.INFO, "compaware.steering"):
        assert steering(regularizer=regularizer, compressor=compressor) is None
    assert len(caplog.records) == 1 and why in caplog.text
    assert "compression alone meets the budget" in caplog.text


@pytest.mark.parametrize(("regularizer", "compressor"), [
    (LowRank(0.1), SVD), (SGL(0.01), Prune), (LowRankSGL(0.01), PruneSVD),
    (LowRankSGL(0.01), Prune)])
def test_a_regularizer_steers_where_the_compressor_removes_what_its_prox_leaves(regularizer,
                                                                                 compressor):
    assert isinstance(steering(regularizer=regularizer, compressor=compressor), Steering)


def test_no_budget_or_steer_false_means_no_steering(caplog):
    model = lenet()
    assert steering_for(LowRank(0.1), SVD(input_shape=SHAPE), model, epochs=3, ramp=0.7) is None
    with caplog.at_level(logging.INFO, "compaware.steering"):
        assert steering_for(LowRank(0.1), SVD(target="macs:0.5", input_shape=SHAPE), model,
                            epochs=3, ramp=0.7, enabled=False) is None
    assert "schedule.steer=false" in caplog.text


def test_the_measure_is_what_compression_without_a_cut_leaves():
    controller = steering(0.5)
    model = lenet()
    assert controller.measure(model)[0] == pytest.approx(1.0)  # random weights: full rank
    with torch.no_grad():  # conv2 at rank 2: the zeros-only svd factorises it
        u, s, vh = torch.linalg.svd(model.conv2.weight.flatten(1), full_matrices=False)
        s[2:] = 0
        model.conv2.weight.copy_(((u * s) @ vh).reshape(model.conv2.weight.shape))
    share, report = controller.measure(model)
    assert report["conv2"]["rank"] == 2 and share < 0.6


@pytest.mark.parametrize("compressor", [SVD, Prune, PruneSVD])
def test_the_measuring_copy_has_no_budget_and_times_nothing(compressor):
    """A latency-aware compressor needs a clock; the copy that measures the structure each
    epoch compresses without one, and removes nothing from a dense model."""
    run = compressor(target="macs:0.5", input_shape=SHAPE, latency_aware=True)
    probe = zeros_only(run)
    model = lenet()
    compressed, _ = probe(model)
    assert run.budget is not None and run.latency_aware and not probe.latency_aware
    assert sum(p.numel() for p in compressed.parameters()) == sum(
        p.numel() for p in model.parameters())


def test_the_strength_rises_above_the_target_and_falls_below_it():
    controller = steering(0.5)
    regularizer, model = controller.regularizer, lenet()
    controller.after_epoch(model, 0, Writer(), 1, next_lr=1e-6, steps=1)  # dense, tiny prox
    assert controller.factor > 1 and regularizer.steering == controller.factor
    assert regularizer.ramp == controller.factor  # the loop's warm-up is at 1
    controller.measure = lambda model: (0.1, {})  # far below every target
    before = controller.factor
    controller.after_epoch(model, 1, Writer(), 2, next_lr=1e-6, steps=1)
    assert controller.factor == pytest.approx(before / MAX_STEP)  # the most it falls per epoch


def test_a_prox_at_a_higher_strength_predicts_less_structure():
    controller = steering(0.25)
    model = lenet()
    shares = [controller.predict(model, factor, 10.0) for factor in (0.01, 1.0, 10.0)]
    assert shares[0] == pytest.approx(1.0) and shares[0] > shares[1] > shares[2]
    assert controller.regularizer.steering == 1.0  # the factor in force is left as it was


def test_the_brake_stops_a_rise_at_the_edge_of_a_cliff():
    """Predictions with a cliff at factor 1.2 (everything above it would go at once): a rise
    to 1.5 is cut back to the edge, found within 1/64 of the rise."""
    controller = steering(0.25, epochs=8, ramp=1.0)
    controller.predict = lambda model, factor, step_size: 0.9 if factor <= 1.2 else 0.1
    writer = Writer()
    controller.after_epoch(lenet(), 0, writer, 1, next_lr=0.1, steps=10)
    assert 1.2 - 0.5 / 64 <= controller.factor <= 1.2
    assert writer.scalars["steer/macs_remaining"] == pytest.approx(1.0)
    assert writer.scalars["steer/macs_target"] == controller.target(1)
    assert writer.scalars["steer/lam"] == pytest.approx(0.1)  # the lam of the epoch measured
    assert {"steer/rank/conv1", "steer/rank/fc1"} <= set(writer.scalars)


def test_steer_ramp_takes_a_share_in_zero_one(make_cfg):
    with pytest.raises(UserError, match="schedule.steer_ramp"):
        validate(make_cfg("schedule.steer_ramp=0"))


# Every stage, short (debug=fast: 4 steps an epoch): pre-training (1 epoch), training toward
# the budget (3), fine-tuning (1).
STEERED = ("debug=fast", "compress.target=macs:0.5", "schedule.pretrain_epochs=1",
           "schedule.epochs=3", "schedule.finetune_epochs=1", "bench.latency=false",
           "schedule.steer_ramp=0.6")  # the target falls over 2 of the 3 epochs


@pytest.fixture(scope="module")
def steered(tmp_path_factory) -> tuple[Path, object]:
    """An undisturbed steered run, and a ``make(*overrides, run_dir)`` for the same config."""

    def make(*overrides: str, run_dir: Path):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=[f"paths.run_dir={run_dir}", *STEERED,
                                                *overrides])

    run_dir = tmp_path_factory.mktemp("steered")
    train(make(run_dir=run_dir))
    return run_dir, make


def test_a_steered_run_records_the_trajectory_in_results_and_tensorboard(steered):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = steered
    steered = json.loads((run_dir / "results.json").read_text())["steering"]
    assert [entry["epoch"] for entry in steered["trajectory"]] == [1, 2, 3]
    targets = [entry["target"] for entry in steered["trajectory"]]
    assert targets[0] < 1 and targets[1:] == [pytest.approx(0.5 * (1 - MARGIN), abs=1e-4)] * 2
    assert steered["trajectory"][0]["lam"] == 0.1  # the configured lam in the first epoch
    assert steered["remaining"] == steered["trajectory"][-1]["remaining"]
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"steer/macs_remaining", "steer/macs_target", "steer/lam"} <= set(tags)
    assert len(events.Scalars("steer/macs_target")) == 3


def test_a_run_killed_mid_epoch_resumes_to_the_same_steered_run(steered, tmp_path):
    """The controller's factor lives in the stage's checkpoint: killed in epoch 2 (after the
    first epoch changed the strength), the resumed run ends with the same weights and the
    same trajectory as one never interrupted."""
    reference, make = steered
    # 4 pre-training steps, then 4 per training epoch: the 10th is the 2nd of epoch 2
    assert run_killed(make(run_dir=tmp_path), "torch.optim:SGD.step", 10) == -signal.SIGKILL
    train(make("resume=true", run_dir=tmp_path))
    assert_same_run(reference, tmp_path)
    first, resumed = (json.loads((d / "results.json").read_text())["steering"]
                      for d in (reference, tmp_path))
    assert resumed == first
    assert first["trajectory"][1]["lam"] != first["trajectory"][0]["lam"]  # it did steer


def test_a_run_resumed_with_steering_switched_on_is_refused(steered, tmp_path):
    """Its checkpoint holds no controller state: steered from there on, it would be a run
    neither config describes."""
    _, make = steered
    assert run_killed(make("schedule.steer=false", run_dir=tmp_path),
                      "torch.optim:SGD.step", 10) == -signal.SIGKILL
    with pytest.raises(UserError, match="written without steering toward the budget"):
        train(make("resume=true", run_dir=tmp_path))
