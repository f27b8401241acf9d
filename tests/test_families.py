"""One torchvision classifier per family, compressed end to end; and compression that never
returns: stopped by ``compress_time_limit`` or by a preemption signal, with a results.json.

Each family's smallest model runs ``svd`` and ``prune`` on synthetic data at the smallest
image size it takes (docs/running.md, "torchvision families"). The default suite runs two
small ones, ``make test-slow`` one compressor per family, ``pytest -m survey`` the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from compaware import rundir
from compaware.compress import Compressor, Prune
from compaware.compress.opaque import opaque_pruners
from compaware.config import UserError
from compaware.data import DataInfo
from compaware.models import check_input_fits, smallest_fitting_size
from compaware.time_limit import TimeLimitExceeded, time_limit
from compaware.train import main, train
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


# Each torchvision family's smallest classifier, at the smallest image size it takes (a size
# below it stops at start naming it: tests/test_models.py).
FAMILIES = {"alexnet": ("alexnet", 63), "vgg": ("vgg11", 32), "resnet": ("resnet18", 32),
            "resnext": ("resnext50_32x4d", 32), "wide_resnet": ("wide_resnet50_2", 32),
            "squeezenet": ("squeezenet1_1", 32), "densenet": ("densenet121", 32),
            "googlenet": ("googlenet", 32), "inception": ("inception_v3", 75),
            "mobilenet_v2": ("mobilenet_v2", 32), "mobilenet_v3": ("mobilenet_v3_small", 32),
            "mnasnet": ("mnasnet0_5", 32), "shufflenet_v2": ("shufflenet_v2_x0_5", 32),
            "efficientnet": ("efficientnet_b0", 32), "efficientnet_v2": ("efficientnet_v2_s", 32),
            "regnet": ("regnet_x_400mf", 32), "convnext": ("convnext_tiny", 32),
            "vit": ("vit_b_32", 32), "swin": ("swin_t", 32), "swin_v2": ("swin_v2_t", 32),
            "maxvit": ("maxvit_t", 221)}

# What each compressor is asked for: something to remove from any model.
FORCED = {"svd": ["compress.target=null", "compress.energy=0.5"], "prune": ["compress.ratio=0.25"]}

# The cases of the default suite: a few seconds each on 2 cores.
QUICK = {("mobilenet_v3", "prune"), ("squeezenet", "svd")}

# The slow suite (CI) runs one compressor per family: Torch-Pruning's, which meets each
# family's own structure, except where SVD's case takes minutes less. `pytest -m survey`
# runs every family with both (about an hour on 2 cores).
SLOW_SUITE = {family: "prune" for family in FAMILIES} | {
    "vgg": "svd", "resnext": "svd", "wide_resnet": "svd", "swin_v2": "svd"}

# AlexNet's and VGG's classifiers (9216 or 25088 → 4096 → 4096) take minutes per SVD on 2
# cores, as in tests/test_matrix.py: SVD acts on their convs here.
CONV_ONLY = {"alexnet", "vgg"}


def _marks(family: str, compressor: str) -> list:
    if (family, compressor) in QUICK:
        return []
    if SLOW_SUITE[family] == compressor:
        return [pytest.mark.slow]
    return [pytest.mark.slow, pytest.mark.survey]


def _family_cases() -> list:
    return [pytest.param(family, compressor, id=f"{family}-{compressor}",
                         marks=_marks(family, compressor))
            for family in FAMILIES for compressor in FORCED]


@pytest.mark.parametrize(("family", "compressor"), _family_cases())
def test_every_torchvision_family_compresses_end_to_end(make_cfg, family, compressor):
    name, size = FAMILIES[family]
    layers = ["compress.layers=conv"] if family in CONV_ONLY and compressor == "svd" else []
    cfg = make_cfg("model=torchvision", f"model.name={name}", "data=synthetic", "data.channels=3",
                   f"data.image_size={size}", "data.limit=32", "data.test_size=16",
                   "schedule.batch_size=8", "schedule.max_steps_per_epoch=2",
                   "regularizer=none", f"compress={compressor}", *FORCED[compressor], *layers,
                   "bench.latency=false")
    results = train(cfg)
    assert results["status"] == "completed"
    assert results["params"]["compressed"] < results["params"]["dense"]


def library_loop(marker: Path | None = None) -> None:
    """Forever, like a library's search that never returns to compaware and swallows every
    :class:`Exception` (a tracer trying another way)."""
    if marker is not None:
        marker.touch()
    while True:
        try:
            sum(range(1000))
        except Exception:  # what must not swallow the time limit or a signal
            pass


class Hang(Compressor):
    """A compressor stuck in :func:`library_loop` while compressing (``where=compress``) or
    while saving its file, in the benchmark stage (``where=save``); ``marker`` is touched
    when it gets there."""

    def __init__(self, where: str = "compress", marker: str | None = None) -> None:
        super().__init__()
        self.where, self.marker = where, Path(marker) if marker else None

    def compress(self, model):
        if self.where == "compress":
            library_loop(self.marker)
        return model, {}

    def save(self, model, run_dir):
        if self.where == "save":
            library_loop(self.marker)
        return None


def test_the_time_limit_stops_a_library_loop_that_swallows_exceptions():
    start = time.monotonic()
    with pytest.raises(TimeLimitExceeded) as stop, time_limit(0.3, "compression",
                                                             "compress_time_limit", "Do less."):
        library_loop()
    assert time.monotonic() - start < 5
    message = str(stop.value)
    assert message.startswith("compression ran past compress_time_limit=0.3 s")
    assert "in tests.test_families.library_loop" in message
    assert "Do less. compress_time_limit takes a number of seconds > 0, or null" in message
    assert "\n" not in message
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # the handler is gone after
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_no_time_limit_and_a_body_within_it_run_as_they_are():
    with time_limit(None, "compression", "compress_time_limit", ""):
        time.sleep(0.05)
    with time_limit(5, "compression", "compress_time_limit", ""):
        value = sum(range(10))
    assert value == 45 and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_compression_past_the_time_limit_leaves_a_failed_results_json(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg("compress=none", "compress._target_=tests.test_families.Hang",
                   "regularizer=none", "bench.latency=false", "compress_time_limit=0.5",
                   "schedule.epochs=0", "schedule.finetune_epochs=0", run_dir=run_dir)
    with pytest.raises(TimeLimitExceeded, match="compress_time_limit=0.5 s"):
        main(cfg)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["error"].startswith("compression ran past compress_time_limit=0.5 s")
    assert "in tests.test_families.library_loop, called from compaware." in results["error"]
    assert "Compress fewer layers" in results["error"]


def test_a_time_limit_that_is_not_a_positive_number_stops_at_start(make_cfg):
    with pytest.raises(UserError, match=r"compress_time_limit=0(\.0)? is out of range; "
                                        r"compress_time_limit takes a number > 0"):
        train(make_cfg("compress_time_limit=0"))


@pytest.mark.parametrize(("where", "stage"), [("compress", "compression"),
                                              ("save", "benchmark")])
def test_sigterm_stops_a_stage_stuck_in_a_library_at_once(tmp_path, where, stage):
    """SIGTERM while compressing or benchmarking (no step boundary to wait for): the run
    stops within seconds as ``preempted``, naming the stage."""
    run_dir, marker = tmp_path / "run", tmp_path / "stuck"
    command = [str(Path(sys.executable).with_name("compaware")), "train", "debug=fast",
               "regularizer=none", "compress=none", "compress._target_=tests.test_families.Hang",
               f"+compress.where={where}", f"+compress.marker={marker}", "bench.latency=false",
               "schedule.epochs=0", "schedule.finetune_epochs=0", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env)
    try:
        while job.poll() is None and not marker.exists():
            time.sleep(0.05)
        time.sleep(0.2)  # well inside the loop
        sent = time.monotonic()
        job.send_signal(signal.SIGTERM)
        output = job.communicate(timeout=60)[0]
    finally:
        job.kill()
    assert job.returncode == 0, output
    assert time.monotonic() - sent < 30
    assert "Traceback" not in output
    assert rundir.status(run_dir) == "preempted"
    error = json.loads((run_dir / "results.json").read_text())["error"]
    assert error.startswith(f"{stage}: preempted by SIGTERM"), error


class TrainingNeedsMore(nn.Module):
    """Runs on any image in eval mode; in training mode (an auxiliary head, say) only on
    images of at least ``size`` pixels, and it moves a running statistic."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.norm, self.head = size, nn.BatchNorm2d(1), nn.Linear(1, 10)

    def forward(self, x):
        if self.training and x.shape[-1] < self.size:
            raise ValueError(f"the auxiliary head needs {self.size} pixels")
        return self.head(self.norm(x).mean((2, 3)))


def test_the_size_a_model_is_said_to_work_from_works_in_training_mode_too():
    model = TrainingNeedsMore(40)
    with pytest.raises(UserError, match=r"auxiliary head needs 40 pixels\. It works from "
                                        r"data.image_size=40"):
        check_input_fits(model, OmegaConf.create({"name": "aux"}),
                         DataInfo("synthetic", 1, 32, 10, 100))
    assert model.training and model.norm.num_batches_tracked == 0  # left as it was
    assert smallest_fitting_size(model, 1, 32) == 40


class AppliesWeightsItself(nn.Module):
    """Uses its linear's weight without calling the linear, as Swin's attention does."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, width)

    def forward(self, x):
        return nn.functional.linear(x, self.qkv.weight) + x


class SplitsIntoHeads(nn.Module):
    """Attention as MaxViT's: its layer's channels split into heads, queries times keys."""

    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.to_qkv, self.merge = heads, nn.Linear(width, 3 * width), nn.Linear(
            width, width)

    def forward(self, x):  # (N, tokens, width)
        q, k, v = (part.unflatten(-1, (self.heads, -1)).transpose(-2, -3)
                   for part in self.to_qkv(x).chunk(3, dim=-1))
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.merge(out.transpose(-2, -3).flatten(-2)) + x


@pytest.mark.parametrize("kind", [AppliesWeightsItself, SplitsIntoHeads])
def test_a_module_whose_channels_torch_pruning_cannot_follow_is_one_node_left_whole(kind):
    model = nn.Sequential(nn.Linear(4, 8), kind(8), nn.ReLU(),
                          nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    pruners = opaque_pruners(model, torch.zeros(1, 5, 4))
    assert set(pruners) == {kind}
    pruned, report = Prune(0.5, input_shape=(5, 4))(model)
    assert report["0"]["kept"] == 8 and kind.__name__ in report["0"]["reason"]
    assert report["3"]["kept"] == 8  # a group that does not reach it is pruned
    inside = [name for name in report if name.startswith("1.")]
    assert inside and all(report[name]["kept"] == report[name]["units"] for name in inside)
    assert pruned(torch.zeros(2, 5, 4)).shape == (2, 5, 3)


class TimesItsParameter(nn.Module):
    """A product with a parameter: a layer of its own, not attention."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix, self.layer = nn.Parameter(torch.eye(width)), nn.Linear(width, width)

    def forward(self, x):
        return self.layer(x) @ self.mix


class SelfAttention(nn.Module):
    """nn.MultiheadAttention, which has a pruner in Torch-Pruning."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("kind", [TimesItsParameter, SelfAttention])
def test_a_product_with_a_parameter_or_torch_pruning_s_own_attention_stays_traced(kind):
    model = nn.Sequential(nn.Linear(4, 8), kind(8), nn.Linear(8, 3))
    assert opaque_pruners(model, torch.zeros(1, 5, 4)) == {}
