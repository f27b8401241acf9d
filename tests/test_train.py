"""The run end to end, in process: results.json, every config option composes, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from compaware import checkpoint, loop
from compaware.config import CONF_DIR, UserError, instantiate
from compaware.data import DataInfo
from compaware.deploy import bench, export
from compaware.deploy.forms import FASTEST, FORMS
from compaware.layers import dead_layers
from compaware.models import build_model
from compaware.summary import collapse_reason, format_summary
from compaware.train import train
from tests.test_inference import ValueDependent

CONF = Path(CONF_DIR)
TIMING = {"batch_size": 4, "min_run_time": 0.01, "threads": 1}  # a quick form_latency


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "regularizer", "compress", "schedule",
                                   "bench", "debug"])
def test_every_option_composes_and_builds(make_cfg, group):
    info = DataInfo("synthetic", 1, 64, 10, 100)  # AlexNet needs 63
    for option in _options(group):
        cfg = make_cfg(f"{group}={option}")
        if group in ("model", "regularizer", "compress"):
            node = cfg[group]
            built = build_model(node, info) if group == "model" else instantiate(node, group)
            assert built is not None


def test_default_run_writes_every_result(make_cfg, tmp_path):
    results = train(make_cfg("compress.rank=2", "compress.target=null"))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["accuracy"] == results["accuracy"]
    for section in ("accuracy", "params", "macs", "bytes"):
        assert set(on_disk[section]) >= {"dense", "compressed"}
    assert set(on_disk["accuracy"]) == {"pretrained", "dense", "compressed", "finetuned"}
    assert on_disk["accuracy"]["pretrained"] is None  # schedule.pretrain_epochs=0
    assert on_disk["params"]["compressed"] < on_disk["params"]["dense"]
    assert on_disk["macs"]["compressed"] < on_disk["macs"]["dense"]
    assert on_disk["bytes"]["compressed"] < on_disk["bytes"]["dense"]
    assert on_disk["bytes"]["dense"] == (tmp_path / "run" / "model_dense.pt2").stat().st_size
    eager = on_disk["latency_ms"]["eager"]
    assert eager["threads"] >= 1 and eager["device"] == "cpu"
    assert all(on_disk["latency_ms"][form] is None  # bench.forms=[eager]: nothing else timed
               for form in [*FORMS, FASTEST] if form != "eager")
    assert "eager ms, batch 1" in format_summary(on_disk)
    assert "CPU threads" in format_summary(on_disk)
    for batch in ("batch_1", "batch_N"):
        assert eager[batch]["dense"] > 0 and eager[batch]["compressed"] > 0
        speedup = eager[batch]["dense"] / eager[batch]["compressed"]
        macs_ratio = on_disk["macs"]["dense"] / on_disk["macs"]["compressed"]
        assert on_disk["efficiency"][batch] == pytest.approx(speedup / macs_ratio)
    if not torch.cuda.is_available():
        assert on_disk["latency_ms"]["cuda"] is None
    assert set(on_disk["seconds"]) == {"train", "compress", "finetune", "bench"}
    assert on_disk["config"]["regularizer"]["_target_"].endswith("LowRank")
    assert on_disk["compression"]["details"]["fc1"]["rank"] == 2
    assert on_disk["collapsed"] is (on_disk["collapse_reason"] is not None)  # rank 2: maybe
    nonzero = on_disk["compression"]["nonzero_params"]
    assert 0 < nonzero <= on_disk["params"]["compressed"]
    assert f"non-zero {nonzero:,}" in " ".join(format_summary(on_disk).split())
    assert any(event.name.startswith("events") for event in (tmp_path / "run" / "tb").iterdir())


def test_onnxruntime_latency_and_efficiency_on_request(make_cfg):
    pytest.importorskip("onnxruntime")
    results = train(make_cfg("compress.rank=2", "compress.target=null",
                             "bench.forms=[eager,onnxruntime]"))
    ort = results["latency_ms"]["onnxruntime"]
    macs_ratio = results["macs"]["dense"] / results["macs"]["compressed"]
    for batch in ("batch_1", "batch_N"):
        assert ort[batch]["dense"] > 0 and ort[batch]["compressed"] > 0
        assert results["efficiency_onnxruntime"][batch] == pytest.approx(
            ort[batch]["dense"] / ort[batch]["compressed"] / macs_ratio)
    assert "onnxruntime ms, batch 1" in format_summary(results)


def test_inductor_latency_is_timed_in_the_compiled_models(monkeypatch, torch_threads):
    compiled = []  # (batch size, threads, convs) of each compilation

    def compile_inductor(model, example, convs):
        compiled.append((len(example), torch.get_num_threads(), convs))
        return export.compile_inductor(model, example, convs)

    monkeypatch.setattr(bench, "compile_inductor", compile_inductor)
    torch.manual_seed(0)
    models = {"dense": torch.nn.Linear(64, 64), "compressed": torch.nn.Linear(64, 8)}
    torch_threads(3)
    timed = bench.form_latency("inductor", models, (64,), **TIMING)
    assert sorted(compiled) == sorted((size, 1, convs) for size in (1, 1, 4, 4)  # each model,
                                      for convs in export.INDUCTOR_CONVS)  # at the threads timed
    assert torch.get_num_threads() == 3  # and restored after
    assert timed["threads"] == 1 and timed["batch_size"] == 4
    for batch in ("batch_1", "batch_N"):
        assert timed[batch]["dense"] > 0 and timed[batch]["compressed"] > 0
        assert set(timed["convs"][batch].values()) <= set(export.INDUCTOR_CONVS)


def test_compiled_each_model_keeps_its_faster_convs_per_batch_size(monkeypatch):
    def name_the_convs(model, example, convs):  # a stand-in for the compiled model
        return lambda batch: convs

    def fake_ms(forward, batch, min_run_time, threads):  # PyTorch's dispatch faster at batch 1
        return 1.0 if (forward(batch) == "aten") == (len(batch) == 1) else 2.0

    monkeypatch.setattr(bench, "compile_inductor", name_the_convs)
    monkeypatch.setattr(bench, "median_ms", fake_ms)
    models = {"dense": torch.nn.Linear(4, 4), "compressed": torch.nn.Linear(4, 4)}
    timed = bench.form_latency("inductor", models, (4,), **TIMING)
    assert timed["convs"] == {"batch_1": {"dense": "aten", "compressed": "aten"},
                              "batch_N": {"dense": "onednn", "compressed": "onednn"}}
    assert timed["batch_1"] == timed["batch_N"] == {"dense": 1.0, "compressed": 1.0}


def test_no_deployed_form_leaves_the_other_results(monkeypatch, caplog):
    def refuse(*_):
        raise UserError("The model cannot be exported to ONNX: an op it lacks.")

    monkeypatch.setattr(export, "export_onnx", refuse)
    models = {"dense": torch.nn.Linear(4, 2)}
    assert bench.form_latency("onnxruntime", models, (4,), **TIMING | {"batch_size": 2}) is None
    assert "an op it lacks" in caplog.text
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert bench.form_latency("onnxruntime", models, (4,), **TIMING | {"batch_size": 2}) is None
    assert "onnxruntime is not installed" in caplog.text
    models = {"dense": torch.nn.Sequential(torch.nn.Linear(4, 2), ValueDependent())}
    assert bench.form_latency("inductor", models, (4,), **TIMING | {"batch_size": 2}) is None
    assert "bench.forms has inductor, but there is no latency compiled by TorchInductor" in (
        caplog.text)


def test_a_run_whose_weights_are_all_pruned_is_recorded_as_collapsed(make_cfg, capsys,
                                                                       caplog):
    results = train(make_cfg("compress=magnitude", "compress.q=100", "bench.latency=false"))
    assert results["collapsed"] is True
    assert "within 5 points of chance" in results["collapse_reason"]  # one class for every image
    assert "in conv1, conv2, fc1, fc2" in results["collapse_reason"]  # every weight zero
    assert f"COLLAPSED: {results['collapse_reason']}" in capsys.readouterr().out
    assert "The run collapsed" in caplog.text
    assert results["objective"] == results["accuracy"]["finetuned"]  # no reward for its ratio


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # Linear(3, 0)
def test_a_layer_without_units_or_with_an_all_zero_weight_is_dead():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 0),
                                torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(2, 2))
    torch.nn.init.zeros_(model[2].weight)
    assert dead_layers(model) == ["1", "2"]
    at_chance = {"accuracy": {"compressed": 14.0, "finetuned": None},
                 "config": {"data": {"num_classes": 10}}}
    assert "14.00 % is within 5 points of chance (10.00 %)" in collapse_reason(at_chance)
    learned = {"accuracy": {"compressed": 14.0, "finetuned": 15.1},
               "config": {"data": {"num_classes": 10}}}
    assert collapse_reason(learned) is None
    assert collapse_reason(learned, ["1", "2"]) == "no units or an all-zero weight in 1, 2"


def test_finetune_epochs_zero_skips_finetuning(make_cfg):
    # per-layer svd: a budget's cut of a model trained for a few steps needs the fine-tuning
    results = train(make_cfg("schedule.finetune_epochs=0", "bench.latency=false",
                             "compress.target=null"))
    assert results["accuracy"]["finetuned"] is None
    assert results["accuracy"]["compressed"] > 30 and results["collapsed"] is False  # judged on it
    assert results["collapse_reason"] is None and "COLLAPSED" not in format_summary(results)
    assert results["latency_ms"] == dict.fromkeys([*FORMS, FASTEST, "cuda"])
    assert results["efficiency"] == {"batch_1": None, "batch_N": None}
    for form in ("channels_last", "strided_pools", "onnxruntime", "inductor", "fastest"):
        assert results[f"efficiency_{form}"] == {"batch_1": None, "batch_N": None}


@pytest.mark.parametrize("retain", [None, True, False])
def test_retain_freed_memory_is_applied_only_on_request(make_cfg, monkeypatch, retain):
    calls = []
    monkeypatch.setattr("compaware.train.retain_freed_memory", lambda: calls.append(1))
    setting = [] if retain is None else [f"retain_freed_memory={retain}"]  # None: the default
    train(make_cfg(*setting, "schedule.finetune_epochs=0", "bench.latency=false"))
    assert len(calls) == int(bool(retain))


class _Interrupted(Exception):
    pass


def test_resume_after_an_interruption_ends_with_the_same_weights(make_cfg, tmp_path,
                                                                  monkeypatch):
    args = ("schedule.pretrain_epochs=1", "schedule.epochs=3", "schedule.finetune_epochs=2",
            "schedule.max_steps_per_epoch=6", "bench.latency=false")
    reference = train(make_cfg(*args, run_dir=tmp_path / "a"))

    real_save, saves = checkpoint.save, []

    def save_then_stop(state, path):  # the process dies right after epoch 2's checkpoint
        real_save(state, path)
        saves.append(path)
        if len(saves) == 3:  # pretrain epoch 1, train epochs 1 and 2
            raise _Interrupted

    monkeypatch.setattr(loop.checkpoint, "save", save_then_stop)
    with pytest.raises(_Interrupted):
        train(make_cfg(*args, run_dir=tmp_path / "b"))
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "b" / "checkpoints" / "train.pt")["epoch"] == 2
    resumed = train(make_cfg(*args, "resume=true", run_dir=tmp_path / "b"))

    for stage in ("pretrain", "train", "finetune"):
        a = checkpoint.load(tmp_path / "a" / "checkpoints" / f"{stage}.pt")["model"]
        b = checkpoint.load(tmp_path / "b" / "checkpoints" / f"{stage}.pt")["model"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    assert resumed["accuracy"] == reference["accuracy"]


def test_a_used_run_dir_is_never_overwritten(make_cfg):
    train(make_cfg("bench.latency=false"))
    with pytest.raises(UserError, match="resume=true"):
        train(make_cfg("bench.latency=false"))


def test_resume_refuses_a_different_experiment(make_cfg):
    train(make_cfg("bench.latency=false"))
    with pytest.raises(UserError, match="model"):
        train(make_cfg("bench.latency=false", "resume=true", "model=lenet300"))


def test_resume_without_a_checkpoint_says_where_to_point(make_cfg):
    with pytest.raises(UserError, match="hydra.run.dir"):
        train(make_cfg("resume=true"))


def test_divergence_stops_with_a_clear_message(make_cfg):
    with pytest.raises(UserError, match="diverged"):
        train(make_cfg("schedule.lr=1e6", "regularizer=none", "schedule.max_steps_per_epoch=50",
                       "data.limit=null"))


def test_init_from_starts_from_another_runs_weights(make_cfg, tmp_path):
    train(make_cfg("bench.latency=false", run_dir=tmp_path / "pre"))
    cfg = make_cfg("bench.latency=false", "schedule.epochs=0", "schedule.finetune_epochs=0",
                   "compress=none", f"init_from={tmp_path / 'pre'}", run_dir=tmp_path / "post")
    results = train(cfg)
    pre = json.loads((tmp_path / "pre" / "results.json").read_text())
    assert results["accuracy"]["dense"] == pre["accuracy"]["dense"]
