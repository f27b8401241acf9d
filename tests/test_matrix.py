"""Every registered model × every regularizer × its natural compressor.

Each case trains a few steps with the regularizer on ``data=synthetic`` at a small input
size, then checks that
  (a) compression with nothing to remove leaves the outputs equal,
  (b) forced compression makes the model smaller in parameters and in MACs,
  (c) the compressed model, exported, reloads with torch alone (``torch.export.load``,
      no compaware class involved) and gives the same outputs.

Models are discovered from ``compaware/conf/model`` (plus torchvision classifiers by name) and
regularizers from ``compaware/conf/regularizer``, so a new YAML is tested without editing this file,
except that a new regularizer must name its natural compressor in
:data:`NATURAL_COMPRESSOR` and a new compressor its settings in :data:`COMPRESSOR_SETTINGS`.
The default suite runs the small models; ``pytest -m slow`` the rest. Each case records
its parameters and MACs (dense -> lossless -> forced) as junit properties
(``pytest -o junit_family=legacy --junitxml=…``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from compaware.compress import Compressor
from compaware.config import CONF_DIR, instantiate
from compaware.data import build_data
from compaware.deploy.bench import count_macs, count_params
from compaware.deploy.export import export_model
from compaware.loop import Stage, fit
from compaware.models import build_model

CONF = Path(CONF_DIR)

# Each regularizer's natural compressor (README, "Methods").
NATURAL_COMPRESSOR = {"none": "svd", "l1": "svd", "l2": "svd", "lowrank": "svd", "sgl": "prune",
                      "lowrank_sgl": "prune+svd", "ssl": "prune", "sws": "quantize"}

# Strengths at which a few training steps leave something to remove exactly in many models
# (singular values soft-thresholded to zero), so that (a) often compresses for real.
STRONG = {"lowrank": ["regularizer.lam=30"],  # × lr × 2 steps: a threshold of 0.6
          # a mixture that, after a few steps from random weights, does not put every
          # weight in the zero component (a trained network's weights are wider)
          "sws": ["regularizer.init_std=0.01", "regularizer.pi_zero=0.5"]}

# Per compressor: its options (``compress.<key>=<value>``) under which it removes nothing,
# and under which it must remove something from any trained model. Quantization has no
# lossless setting (every weight moves to a shared value), so (a) does not apply to it.
COMPRESSOR_SETTINGS = {
    "svd": {"lossless": ["target=null", "energy=1.0", "rank=null"],
            "forced": ["target=null", "rank=2"]},
    "prune": {"lossless": ["ratio=0.0"], "forced": ["ratio=0.5"]},
    "prune+svd": {"lossless": ["ratio=0.0", "energy=1.0", "rank=null"],
                  "forced": ["ratio=0.5", "rank=2"]},
    "quantize": {"lossless": None, "forced": ["merge_kl=1.0e-10"]},
}

# Compressors that keep the layers' shapes and make the model smaller in their own file
# format (zeros and shared values, docs/methods.md): MACs stay those of the dense layers, and
# (b) counts the non-zero parameters and the stored file's bytes instead.
STORED = {"quantize"}

# torchvision classifiers beyond the registered YAMLs: efficient designs (depthwise and
# grouped convs, squeeze-excitation, channel shuffle, concatenation).
TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vgg11",
               "densenet121", "regnet_x_400mf", "shufflenet_v2_x0_5"]

# Models with more than one configuration worth testing, and what each needs; any other
# model runs as its YAML stands.
VARIANTS: dict[str, list[tuple[str, list[str]]]] = {
    "torchvision": [(name, [f"model.name={name}"]) for name in TORCHVISION],
    "decomposeme": [("dec8", ["model.preset=dec8"]),
                    ("dec3", ["model.preset=dec3", "data.channels=1", "data.num_classes=36"])],
    "alexnet": [("", ["data.image_size=63"])],  # its pooling needs 63×63
}

# AlexNet's and VGG's classifiers (9216 or 25088 → 4096 → 4096) take minutes per SVD on 2
# cores: the methods act on their convs here (``layers=conv``), on linears in every other model.
CONV_ONLY = {"alexnet", "torchvision-vgg11"}

# Small inputs, a few steps of training.
BASE = ["data=synthetic", "data.channels=3", "data.image_size=32", "data.num_classes=10",
        "data.train_size=32", "data.test_size=16", "schedule.batch_size=8",
        "schedule.max_steps_per_epoch=2", "schedule.epochs=1", "schedule.lr=0.01"]

# The cases of the default suite (a few seconds each): every regularizer on LeNet-5, and
# the natural pairing on a model of each kind; every other case is marked slow.
DEFAULT_SUITE = {("lenet5", r) for r in NATURAL_COMPRESSOR} | {
    (model, "lowrank") for model in ("lenet300", "decomposeme-dec3",
                                     "torchvision-mobilenet_v3_small")}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _model_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for option in _options("model"):
        for suffix, overrides in VARIANTS.get(option, [("", [])]):
            cases.append((f"{option}-{suffix}" if suffix else option,
                          [f"model={option}", *overrides]))
    return cases


def _matrix() -> list:
    params = []
    for model_id, overrides in _model_cases():
        for regularizer in _options("regularizer"):
            slow = (model_id, regularizer) not in DEFAULT_SUITE
            params.append(pytest.param(model_id, overrides, regularizer,
                                       id=f"{model_id}-{regularizer}",
                                       marks=[pytest.mark.slow] if slow else []))
    return params


def test_every_regularizer_and_compressor_has_matrix_settings():
    missing = set(_options("regularizer")) - set(NATURAL_COMPRESSOR)
    assert not missing, f"add the natural compressor of {missing} to NATURAL_COMPRESSOR"
    assert set(NATURAL_COMPRESSOR.values()) <= set(COMPRESSOR_SETTINGS)
    assert set(NATURAL_COMPRESSOR.values()) <= set(_options("compress"))


@pytest.mark.parametrize(("model_id", "overrides", "regularizer"), _matrix())
def test_train_compress_reload(make_cfg, tmp_path, record_property, model_id, overrides,
                               regularizer):
    compressor = NATURAL_COMPRESSOR[regularizer]
    cfg = make_cfg(*BASE, *overrides, f"regularizer={regularizer}", f"compress={compressor}",
                   *STRONG.get(regularizer, []))
    for node in (cfg.regularizer, cfg.compress):
        if model_id in CONV_ONLY and "layers" in node:
            node.layers = "conv"
    torch.manual_seed(0)
    data = build_data(cfg.data)
    model = build_model(cfg.model, data.info)
    trained_with = instantiate(cfg.regularizer, "regularizer")
    fit(model, data, Stage("train", 1, cfg.schedule.lr, trained_with), cfg.schedule, seed=0,
        device=torch.device("cpu"), checkpoint_path=tmp_path / "c.pt",
        writer=SummaryWriter(str(tmp_path / "tb")), resume=False, meta={})
    model.eval()
    info = data.info
    shape = (info.channels, info.image_size, info.image_size)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        dense = model(x)
    tolerance = {"rtol": 1e-3, "atol": 1e-3 * float(dense.abs().max()) + 1e-5}

    settings = COMPRESSOR_SETTINGS[compressor]

    def compress(setting: str) -> tuple[torch.nn.Module, dict, Compressor]:
        node = OmegaConf.merge(cfg.compress, OmegaConf.from_dotlist(settings[setting]))
        compressor_ = instantiate(node, "compress")
        compressed, report = compressor_(model, trained_with.artifacts(model))
        return compressed.eval(), report, compressor_

    lossless = model
    if settings["lossless"] is not None:
        lossless, _, _ = compress("lossless")
        with torch.no_grad():
            torch.testing.assert_close(lossless(x), dense, **tolerance)  # (a)

    forced, report, forcing = compress("forced")
    record_property("input", "×".join(map(str, shape)))
    counts = {"params": count_params, "macs": lambda m: count_macs(m, shape)}
    if compressor in STORED:
        dense_file = export_model(model, torch.zeros(2, *shape), tmp_path / "dense.pt2")
        counts = {"nonzero params": lambda m: sum(int(p.count_nonzero()) for p in m.parameters()),
                  "bytes": lambda m: dense_file if m is model else
                  forcing.save(m, tmp_path)["bytes"]}
    for key, count in counts.items():
        dense_count, forced_count = count(model), count(forced)
        record_property(key, f"{dense_count} -> {count(lossless)} -> {forced_count}")
        assert forced_count < dense_count, f"forced {compressor} kept the {key}: {report}"  # (b)
        assert forced_count > 0, f"forced {compressor} left no {key}: {report}"

    export_model(forced, torch.zeros(2, *shape), tmp_path / "forced.pt2")
    reloaded = torch.export.load(str(tmp_path / "forced.pt2")).module()  # graph + weights only
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), forced(x), rtol=1e-4, atol=1e-5)  # (c)
