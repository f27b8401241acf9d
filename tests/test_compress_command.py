"""`compaware compress`: an already-trained model compressed without training it, from the
weight files users have (plain, Lightning, DDP), torchvision's weights from the hub cache,
or a model class of the user's own (examples/my_model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from compaware import checkpoint
from compaware.config import COMPRESS_RUN, CONF_DIR, UserError, check_compress_run
from compaware.data import build_data
from compaware.loop import evaluate
from compaware.models import build_model, tv
from compaware.models.lenet import LeNet5
from compaware.models.tv import torchvision_classifier
from compaware.rundir import RunDirInUse
from compaware.sweep_check import check_sweep
from compaware.train import run, train
from tests.conftest import REPO

FAST = ("debug=fast", "bench.latency=false")


def compress_cfg(run_dir: Path, *overrides: str):
    """The config `compaware compress` composes (compaware/conf/compress_run.yaml)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("compress_run", overrides=[*FAST, f"paths.run_dir={run_dir}",
                                                  *overrides])


def compress(run_dir: Path, *overrides: str) -> dict:
    cfg = compress_cfg(run_dir, *overrides)
    check_compress_run(cfg)
    return train(cfg)


def lenet_weights() -> dict:
    torch.manual_seed(1)
    return LeNet5().state_dict()


FORMATS = {  # how users' tools save a state_dict
    "plain": lambda w: w,
    "compaware": lambda w: {"model": w, "epoch": 3},
    "lightning": lambda w: {"state_dict": {f"model.{k}": v for k, v in w.items()}
                                          | {"criterion.weight": torch.ones(10)},
                            "epoch": 3, "global_step": 120},
    "ddp": lambda w: {f"module.{k}": v for k, v in w.items()},
    "lightning+ddp": lambda w: {"state_dict": {f"model.module.{k}": v for k, v in w.items()}},
    "tutorial": lambda w: {"model_state_dict": w, "optimizer_state_dict": {}},
}


@pytest.mark.parametrize("form", FORMATS)
def test_every_usual_weights_file_loads_exactly(form, tmp_path):
    weights = lenet_weights()
    torch.save(FORMATS[form](weights), tmp_path / "w.pt")
    model = LeNet5()
    checkpoint.load_weights(model, tmp_path / "w.pt")
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_weights_of_another_model_name_a_few_missing_and_unexpected_keys(tmp_path):
    torch.save({f"layer{i}.weight": torch.ones(2) for i in range(9)}, tmp_path / "w.pt")
    with pytest.raises(UserError) as error:
        checkpoint.load_weights(LeNet5(), tmp_path / "w.pt")
    message = str(error.value)
    assert "init_from" in message and "layer0.weight" in message and "and 5 more" in message
    assert "\n" not in message  # one paragraph


def test_weights_of_other_shapes_name_the_layer_and_both_shapes(tmp_path):
    torch.save(LeNet5(num_classes=100).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"(?s)fc2.weight \(100, 500\) in the file, \(10, 500\)"):
        checkpoint.load_weights(LeNet5(), tmp_path / "w.pt")


def test_a_pickled_model_is_refused_with_how_to_save_a_state_dict(tmp_path):
    torch.save(LeNet5(), tmp_path / "w.pt")  # the whole module: unpickling would run code
    with pytest.raises(UserError, match=r"weights_only.*state_dict\(\)"):
        checkpoint.load_weights(LeNet5(), tmp_path / "w.pt")


def test_compress_compresses_the_weights_as_they_are(tmp_path):
    weights = lenet_weights()
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()}}, tmp_path / "w.pt")
    results = compress(tmp_path / "run", f"init_from={tmp_path / 'w.pt'}", "compress=prune",
                       "compress.target=macs:0.5")
    cfg = compress_cfg(tmp_path / "other")
    model = LeNet5()
    model.load_state_dict(weights)
    assert results["accuracy"]["dense"] == evaluate(model, build_data(cfg.data),
                                                    torch.device("cpu"))
    assert results["accuracy"]["pretrained"] is None and results["status"] == "completed"
    assert results["macs"]["compressed"] <= 0.5 * results["macs"]["dense"] * 1.03
    assert not (tmp_path / "run" / "checkpoints" / "train.pt").exists()  # nothing trained
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "completed" and saved["config"]["schedule"]["epochs"] == 0


def test_compress_without_weights_says_how_to_give_them(tmp_path):
    with pytest.raises(UserError, match=r"init_from=.*model.weights=DEFAULT"):
        check_compress_run(compress_cfg(tmp_path))


def test_compress_refuses_to_train(tmp_path):
    with pytest.raises(UserError, match="compaware train init_from"):
        check_compress_run(compress_cfg(tmp_path, "init_from=w.pt", "schedule.epochs=2"))


def test_compress_ignores_the_training_of_an_experiment(tmp_path):
    cfg = compress_cfg(tmp_path, "experiment=wen2016_lenet_fashion_cpu", "init_from=w.pt")
    assert cfg.schedule.epochs == 0 and cfg.schedule.pretrain_epochs == 0
    assert cfg.regularizer._target_ == "compaware.regularizers.Regularizer"


def test_a_compress_run_resumes_from_its_weights(tmp_path):
    """A run that trains nothing has no dense checkpoint: resumed, it reads init_from again."""
    torch.save(lenet_weights(), tmp_path / "w.pt")
    args = (f"init_from={tmp_path / 'w.pt'}", "compress=none")
    first = compress(tmp_path / "run", *args)
    resumed = compress(tmp_path / "run", *args, "resume=true")
    assert resumed["accuracy"] == first["accuracy"]


def test_a_compress_run_resumed_from_other_weights_is_refused(tmp_path):
    for name in ("a.pt", "b.pt"):
        torch.save(lenet_weights(), tmp_path / name)
    compress(tmp_path / "run", f"init_from={tmp_path / 'a.pt'}", "compress=none")
    with pytest.raises(RunDirInUse, match="differs from the interrupted run in init_from"):
        compress(tmp_path / "run", f"init_from={tmp_path / 'b.pt'}", "compress=none",
                 "resume=true")


def test_a_refused_compress_run_leaves_a_failed_results_json(tmp_path):
    with pytest.raises(UserError, match="none were given"):
        run(compress_cfg(tmp_path / "run"), check_compress_run)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "failed" and "none were given" in saved["error"]


def test_a_compress_sweep_is_checked_as_compress_runs(tmp_path):
    sweep = ["-m", f"init_from={tmp_path / 'w.pt'}", "schedule.epochs=0,2"]
    check_sweep(sweep, "config")  # compaware train may train from these weights
    with pytest.raises(UserError, match=r"schedule.epochs=2: compaware compress does not train"):
        check_sweep(sweep, COMPRESS_RUN)


# torchvision's weights, from a fake hub cache holding a randomly initialised model's.

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """TORCH_HOME with resnet18's IMAGENET1K_V1 file: a random resnet18's state_dict."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(2)
    model = torchvision_classifier("resnet18")
    torch.save(model.state_dict(), home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    return home, model.state_dict()


def as_torchvisions_file(path: Path, monkeypatch) -> None:
    """Take ``path``, a stand-in saved under a torchvision file's name, for that file: its
    hash for the one the name says."""
    monkeypatch.setattr(tv, "name_hash", lambda name: tv.sha256(path)[:8])


@pytest.fixture
def torch_home(hub, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(hub[0]))
    as_torchvisions_file(hub[0] / "hub" / "checkpoints" / "resnet18-f37072fd.pth", monkeypatch)
    return hub


def test_torchvision_weights_come_from_the_hub_cache(torch_home):
    model = torchvision_classifier("resnet18", weights="DEFAULT", image_size=64)
    saved = torch_home[1]
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


def test_absent_torchvision_weights_name_the_path_and_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UserError) as error:
        torchvision_classifier("resnet18", weights="IMAGENET1K_V1")
    message = str(error.value)
    assert str(path) in message and "https://download.pytorch.org/models/resnet18-f37072fd.pth" \
        in message and "downloads nothing" in message
    assert not path.exists()


def test_an_unknown_weights_name_lists_the_known_ones(torch_home):
    with pytest.raises(UserError, match="model.weights takes one of: DEFAULT, IMAGENET1K_V1"):
        torchvision_classifier("resnet18", weights="IMAGENET")


def test_other_classes_need_new_head_which_keeps_the_rest(torch_home):
    with pytest.raises(UserError, match="model.new_head=true"):
        torchvision_classifier("resnet18", num_classes=10, weights="DEFAULT")
    model = torchvision_classifier("resnet18", num_classes=10, weights="DEFAULT", new_head=True)
    saved = torch_home[1]
    assert model.fc.weight.shape == (10, 512)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items()
               if not k.startswith("fc."))


def test_gray_data_is_refused_for_colour_weights(torch_home):
    with pytest.raises(UserError, match="data.channels=3"):
        torchvision_classifier("resnet18", in_channels=1, weights="DEFAULT")


def test_a_file_whose_hash_is_not_its_names_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(torchvision_classifier("resnet18").state_dict(), path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert tv.name_hash(path.name) == "f37072fd"
    with pytest.raises(UserError, match=r"SHA-256 begins [0-9a-f]{8}, the file's name says "
                                        r"f37072fd.*resnet18-f37072fd.pth"):
        torchvision_classifier("resnet18", weights="DEFAULT")


def test_code_in_the_hub_cache_is_not_run(tmp_path, monkeypatch):
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(torchvision_classifier("resnet18"), path)  # a pickled module, not a state_dict
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    as_torchvisions_file(path, monkeypatch)
    with pytest.raises(UserError, match="cannot be loaded"):
        torchvision_classifier("resnet18", weights="DEFAULT")
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_the_torchvision_config_takes_weights_and_new_head(torch_home, tmp_path):
    cfg = compress_cfg(tmp_path, "model=torchvision", "model.weights=DEFAULT",
                       "model.new_head=true", "data=synthetic", "data.channels=3",
                       "data.image_size=32")
    check_compress_run(cfg)  # model.weights is trained weights enough
    model = build_model(cfg.model, build_data(cfg.data).info)
    assert model.fc.out_features == 10
    assert torch.equal(model.conv1.weight, torch_home[1]["conv1.weight"])


@pytest.mark.slow
def test_compress_a_torchvision_model_with_its_weights(torch_home, tmp_path):
    results = compress(tmp_path / "run", "model=torchvision", "model.weights=DEFAULT",
                       "model.new_head=true", "data=synthetic", "data.channels=3",
                       "data.image_size=32", "data.limit=64", "compress=prune",
                       "compress.target=macs:0.5", "schedule.batch_size=16")
    assert results["status"] == "completed"
    assert results["macs"]["compressed"] < results["macs"]["dense"]


# The user's own model class: examples/my_model, as its README runs it.

def test_compress_a_model_of_the_users_own_package(tmp_path):
    torch.manual_seed(0)
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from my_model import TinyNet
    finally:
        sys.path.remove(str(REPO / "examples"))
    torch.save(TinyNet(in_channels=1, width=8).state_dict(), tmp_path / "tiny.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "examples"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [str(Path(sys.executable).with_name("compaware")), "compress",
         "model._target_=my_model.TinyNet", "+model.width=8", f"init_from={tmp_path / 'tiny.pt'}",
         *FAST, "compress=prune", "compress.target=macs:0.5", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["config"]["model"]["width"] == 8
    assert results["macs"]["compressed"] <= 0.5 * results["macs"]["dense"] * 1.03
    assert "run directory" in out.stdout
