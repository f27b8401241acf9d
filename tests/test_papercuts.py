"""Papercuts: small things a first user trips over, each kept fixed by a test here."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch
import torch.utils.benchmark
from torch import nn
from torch.utils.benchmark.utils.common import Measurement, TaskSpec

from compaware.config import BenchConfig, UserError
from compaware.deploy import bench
from compaware.summary import format_summary
from compaware.sweep_check import check_names, check_sweep
from compaware.train import run_app, train
from compaware.train_help import describe, groups
from tests.conftest import REPO


class FakeTimer:
    """torch.utils.benchmark.Timer answering each measurement with the next runs of
    ``RUNS`` (seconds): a clock the test decides."""

    RUNS: list[list[float]] = []

    def __init__(self, **_) -> None:
        pass

    def blocked_autorange(self, min_run_time: float) -> Measurement:
        return Measurement(1, FakeTimer.RUNS.pop(0), TaskSpec("forward(batch)", "pass"))


def _measure(monkeypatch, tmp_path, runs: list[list[float]]) -> dict:
    """bench.measure of two small models on the CPU, its clock answering ``runs``."""
    FakeTimer.RUNS = list(runs)
    monkeypatch.setattr(torch.utils.benchmark, "Timer", FakeTimer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    models = {"dense": nn.Sequential(nn.Linear(4, 4)),
              "compressed": nn.Sequential(nn.Linear(4, 2))}
    return bench.measure(models, (4,), BenchConfig(batch_size=2), tmp_path)


def test_latency_keeps_the_spread_of_its_runs_and_warns_when_it_is_wide(
        monkeypatch, tmp_path, caplog):
    steady, busy = [1e-3] * 8, [1e-3] * 4 + [4e-3, 8e-3, 15e-3, 20e-3]  # IQR: 0, 3.5 × median
    with caplog.at_level(logging.WARNING, logger="compaware.deploy.bench"):  # batch 1 dense,
        costs = _measure(monkeypatch, tmp_path, [steady, steady, steady, busy])  # compressed …
    eager = costs["latency_ms"]["eager"]
    assert eager["batch_N"]["compressed"] == 2.5  # the median of the busy runs, in ms
    assert eager["spread"]["batch_1"] == {"dense": 0.0, "compressed": 0.0}
    assert eager["spread"]["batch_N"]["compressed"] > bench.WIDE_SPREAD
    assert eager["wide_spread"] == {"batch_1": False, "batch_N": True}
    assert "eager batch_N compressed (350%)" in caplog.text and "batch_1" not in caplog.text
    results = {"accuracy": {"dense": 90.0, "compressed": 90.0, "finetuned": None},
               "seconds": {"bench": 1.0}} | costs
    summary = format_summary(results)
    assert "eager ms, batch 2 *" in summary and "eager ms, batch 1 *" not in summary
    assert "* its runs spread wide" in summary


def test_steady_latency_gives_no_warning(monkeypatch, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="compaware.deploy.bench"):
        costs = _measure(monkeypatch, tmp_path, [[1e-3, 1.01e-3, 0.99e-3, 1e-3]] * 4)
    assert costs["latency_ms"]["eager"]["wide_spread"] == {"batch_1": False, "batch_N": False}
    assert "spread wide" not in caplog.text
    results = {"accuracy": {"dense": 90.0, "compressed": 90.0, "finetuned": None},
               "seconds": {"bench": 1.0}} | costs
    assert "*" not in format_summary(results)


def test_kmeans_fine_tuning_with_the_default_sgd_keeps_the_accuracy(make_cfg):
    """The default schedule (SGD with momentum at 0.1 × lr) fine-tunes k-means' shared values
    without losing what compression kept: with each member given the sum of the members'
    gradients, LeNet-5's fc1 values (about 13,000 members each) took steps thousands of times
    too large and this run fell from 48.9 % to 9.4 %."""
    results = train(make_cfg("regularizer=none", "compress=kmeans", "bench.latency=false"))
    accuracy = results["accuracy"]
    assert accuracy["compressed"] > 30  # a model worth keeping (48.9 % on 4 steps of digits)
    assert accuracy["finetuned"] >= accuracy["compressed"] - 2


@pytest.mark.parametrize(("override", "expected"), [
    ("regularizr=lowrank", "no config group or key 'regularizr'. Did you mean regularizer?"),
    ("regularizr.lam=0.5", "no config group or key 'regularizr'. Did you mean regularizer?"),
    ("sed=3", "Did you mean seed?"),
    ("regularizer=lowrnk", "no option regularizer/lowrnk (no compaware/conf/regularizer/"
                           "lowrnk.yaml). Did you mean lowrank?"),
    ("schedule.lrr=0.1", "schedule has no key 'lrr'. Did you mean lr?"),
    ("regularizer.lamm=0.5", "regularizer=lowrank has no key 'lamm'. Did you mean lam?"),
])
def test_a_misspelt_name_is_named_with_the_closest_and_those_available(override, expected):
    with pytest.raises(UserError, match=re.escape(expected)) as refused:
        check_names([override])
    assert "+" not in str(refused.value)  # not Hydra's advice to add the misspelt key
    assert str(refused.value).startswith(f"{override}: ")


def test_a_misspelt_key_of_a_chosen_option_is_named_and_another_factorys_keys_pass():
    with pytest.raises(UserError, match="compress=prune has no key 'ratoi'. Did you mean ratio?"):
        check_names(["compress=prune", "compress.ratoi=0.3"])
    check_names(["regularizer=sgl", "regularizer.alpha=0.2"])  # lowrank has no alpha; sgl has
    check_names(["model._target_=my.Net", "model.width=3"])  # the factory's own keys
    check_names(["experiment=wen2016_lenet_mnist", "regularizer.anything=1"])  # composed later


def test_existing_names_additions_and_sweeps_pass_the_name_check():
    check_names(["regularizer=sgl", "regularizer.lam=0.5", "model=torchvision",
                 "model.name=resnet18", "data.limit=10", "seed=1", "hydra.run.dir=/tmp/x",
                 "+regularizr=kept_for_hydra", "~init_from", "-m", "compress=svd,kmeans"])
    # a sweep's unknown options are left to check_sweep, which names every one
    with pytest.raises(UserError, match=re.escape("compress=kmean: there is no option "
                                                  "compress/kmean ")):
        check_sweep(["-m", "compress=svd,kmean"])


def test_the_console_script_refuses_a_misspelt_group_before_hydra(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compaware train", "regularizr=lowrank"])
    with pytest.raises(SystemExit, match="Did you mean regularizer"):
        run_app()


def test_train_help_describes_groups_options_and_keys_without_torch():
    script = ("import sys\nsys.argv = ['compaware', 'train', 'compress=kmeans', '--help']\n"
              "from compaware.cli import main\n"
              "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0\n"
              "assert 'torch' not in sys.modules, 'the help imported torch'\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for group, options in groups().items():
        assert f"  {group}:" in text and all(option in text for option in options)
    assert "* lowrank      Nuclear norm (Alvarez & Salzmann 2017)" in text  # the default
    assert " >kmeans" in text  # chosen on the command line: its keys described
    assert "compress.linear_bits=5" in text and "Han: 5 bits for fully connected" in text
    assert "schedule.epochs=10" in text and "epochs of training with the regularizer" in text
    assert "regularizer.lam=0.1" in text and "device=cpu" in text


def test_python_dash_m_gives_the_same_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compaware.train", "--help"])
    run_app()
    assert capsys.readouterr().out.strip() == describe(["--help"]).strip()
