"""Structured pruning: removing zero units is exact (LeNets, a ResNet with residual coupling),
ratio pruning keeps the largest units, no layer loses its last unit, and bad options say so."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from compaware.compress import Prune, PruneSVD
from compaware.config import UserError
from compaware.deploy.bench import count_macs, count_params
from compaware.models.lenet import LeNet5, LeNet300
from compaware.models.tv import torchvision_classifier
from tests.conftest import assert_reloads_without_compaware, run_cli


def _resnet() -> nn.Module:
    """ResNet-18 on 32×32×1 with BatchNorms that are far from identity (random statistics,
    scale and shift), so that a BatchNorm left on a removed channel would show."""
    torch.manual_seed(0)
    return randomize_norms(torchvision_classifier("resnet18", in_channels=1, num_classes=10,
                                                  image_size=32))


def randomize_norms(model: nn.Module) -> nn.Module:
    """Random statistics, scale and shift for every BatchNorm2d of ``model`` (in place)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _zero(model: nn.Module, units: dict[str, list[int]]) -> nn.Module:
    """Zero the given units' weights and biases (a BatchNorm's scale and shift)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, idxs in units.items():
            for p in (modules[name].weight, modules[name].bias):
                if p is not None:
                    p[idxs] = 0
    return model


STAGE1_RESIDUAL = ["conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2",
                   "layer1.1.bn2"]  # everything that writes the channels of ResNet's stage 1

CASES = {
    "lenet300": (LeNet300, (1, 28, 28), {"fc1": list(range(0, 300, 3)), "fc2": [1, 50, 99]},
                 {"fc1": 200, "fc2": 97, "fc3": 10}),
    "lenet5": (LeNet5, (1, 28, 28),
               {"conv1": [0, 7, 19], "conv2": list(range(0, 50, 5)), "fc1": list(range(100))},
               {"conv1": 17, "conv2": 40, "fc1": 400, "fc2": 10}),
    "resnet18": (_resnet, (1, 32, 32),
                 {"layer1.0.conv1": [1, 2, 3], "layer1.0.bn1": [1, 2, 3],
                  "layer3.1.conv1": [0], "layer3.1.bn1": [0],
                  **dict.fromkeys(STAGE1_RESIDUAL, [5, 7])},
                 {"layer1.0.conv1": 61, "layer3.1.conv1": 255, "conv1": 62, "layer1.0.conv2": 62,
                  "layer1.1.conv2": 62, "layer2.0.conv2": 128, "fc": 10}),
}


@pytest.mark.parametrize("case", CASES)
def test_removing_zero_units_leaves_the_outputs_unchanged(case):
    factory, shape, zeros, expected_units = CASES[case]
    model = _zero(factory(), zeros)
    model.train()  # compress from training mode, as the run does: BatchNorm stats must not move
    compressed, report = Prune(input_shape=shape)(model)
    model.eval()
    compressed.eval()
    x = torch.randn(4, *shape)
    torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=1e-4)
    assert {name: report[name]["kept"] for name in expected_units} == expected_units
    assert count_params(compressed) < count_params(model)
    assert count_macs(compressed, shape) < count_macs(model, shape)


def test_the_pruned_model_reloads_without_compaware(tmp_path):
    factory, shape, zeros, _ = CASES["lenet5"]
    compressed, _ = Prune(input_shape=shape)(_zero(factory(), zeros))
    assert_reloads_without_compaware(compressed, torch.randn(3, *shape), tmp_path)


def test_a_zero_filter_still_feeding_a_batchnorm_shift_is_kept():
    # layer2.0.conv1's filter 4 outputs 0, but its BatchNorm turns that into β − γ·mean/std;
    # channel 9 of stage 1 is zero in every layer writing it except the last block's BatchNorm.
    model = _zero(_resnet(), {"layer2.0.conv1": [4],
                              **dict.fromkeys(STAGE1_RESIDUAL[:-1], [9])})
    compressed, report = Prune(input_shape=(1, 32, 32))(model)
    assert report["layer2.0.conv1"]["kept"] == 128
    assert report["layer1.0.conv2"]["kept"] == 64
    model.eval()
    compressed.eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(compressed(x), model(x))


def test_ratio_removes_the_units_with_the_smallest_group_norms():
    torch.manual_seed(0)
    model = LeNet5()
    compressed, report = Prune(ratio=0.5)(model)
    assert {name: r["kept"] for name, r in report.items()} == {
        "conv1": 10, "conv2": 25, "fc1": 250, "fc2": 10}
    norms = torch.cat([model.conv1.weight.flatten(1), model.conv1.bias[:, None]], 1).norm(dim=1)
    largest = norms.argsort(descending=True)[:10].sort().values
    torch.testing.assert_close(compressed.conv1.weight, model.conv1.weight[largest])
    assert compressed.conv2.in_channels == 10 and compressed.fc2.in_features == 250
    assert compressed(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_ratio_on_a_resnet_keeps_residual_channels_consistent():
    model = torchvision_classifier("resnet18", in_channels=1, num_classes=10, image_size=32)
    compressed, report = Prune(ratio=0.5, input_shape=(1, 32, 32))(model)
    assert all(r["kept"] == r["units"] // 2 for name, r in report.items() if name != "fc")
    assert report["fc"] == {"units": 10, "kept": 10}
    assert compressed(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_a_model_that_does_not_trace_as_a_whole_is_pruned_inside_its_parts():
    # ShuffleNet's channel shuffle defeats Torch-Pruning's tracer; each block's branches trace
    model = torchvision_classifier("shufflenet_v2_x0_5", num_classes=10).eval()
    branch = model.stage2[1].branch2  # 1×1 conv, BN, ReLU, depthwise 3×3, BN, 1×1 conv, …
    with torch.no_grad():
        for layer in (branch[0], branch[1], branch[3], branch[4]):  # 5 internal units dead
            layer.weight[:5] = 0
            if layer.bias is not None:
                layer.bias[:5] = 0
    x = torch.randn(2, 3, 32, 32)
    exact, report = Prune(input_shape=(3, 32, 32))(model)
    assert report["stage2.1.branch2.0"] == {"units": 24, "kept": 19, "zero_units": 5}
    torch.testing.assert_close(exact(x), model(x))
    smaller, report = Prune(ratio=0.5, input_shape=(3, 32, 32))(model)
    assert report["stage4.0.branch2.0"]["kept"] == 48  # inside a block: half
    assert report["stage4.0.branch2.5"]["kept"] == 96  # the block's output: the shuffle's
    assert count_macs(smaller, (3, 32, 32)) < 0.8 * count_macs(model, (3, 32, 32))
    assert smaller(x).shape == (2, 10)


def test_channels_tied_to_a_groupnorm_or_a_grouped_conv_are_left_whole():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, groups=2),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 3))
    compressed, report = Prune(ratio=0.5, input_shape=(1, 10, 10))(model)
    assert report["0"] == {"units": 8, "kept": 8, "reason": "coupled to GroupNorm 1"}
    assert report["2"] == {"units": 8, "kept": 8, "reason": "coupled to Conv2d 2"}
    assert report["5"] == {"units": 6, "kept": 3, "zero_units": 0}
    assert compressed(torch.randn(2, 1, 10, 10)).shape == (2, 3)


def test_a_layer_is_never_pruned_to_zero_width(caplog):
    model = _zero(LeNet300(), {"fc1": list(range(300))})
    with caplog.at_level(logging.WARNING):
        compressed, report = Prune()(model)
    assert report["fc1"] == {"units": 300, "kept": 1, "zero_units": 300,  # and, reading
                             "columns": 784, "live_columns": 0, "replaced": True}  # nothing,
    assert "fc1" in caplog.text and "keeping one" in caplog.text  # it is only a bias
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(compressed(x), model(x))


def test_nothing_to_prune_changes_nothing():
    model = LeNet5()
    compressed, report = Prune()(model)
    assert all(r["kept"] == r["units"] and r.get("zero_units", 0) == 0 for r in report.values())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(compressed(x), model(x))
    assert compressed is not model and model.conv1.out_channels == 20


def test_selected_layers_only():
    compressed, report = Prune(ratio=0.5, layers="linear")(LeNet5())
    assert {name: r["kept"] for name, r in report.items()} == {
        "conv1": 20, "conv2": 50, "fc1": 250, "fc2": 10}


def test_prune_then_svd_is_exact_on_zero_units_and_low_rank_layers():
    torch.manual_seed(0)
    model = _zero(LeNet5(), {"fc1": list(range(0, 500, 2)), "conv2": [3]})
    with torch.no_grad():  # fc1 of rank 8 on the units that survive
        fc1 = model.fc1.weight
        fc1[1::2] = torch.randn(250, 8) @ torch.randn(8, 800) / 30
    compressed, report = PruneSVD(input_shape=(1, 28, 28))(model)
    assert report["fc1"] == {"units": 500, "kept": 250, "zero_units": 250, "rank": 8,
                             "full_rank": 250, "factorized": True}
    assert report["conv2"]["kept"] == 49
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(compressed(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"ratio": 1}, "compress.ratio"),
    ({"ratio": -0.1}, "compress.ratio"),
    ({"threshold": 2}, "compress.threshold"),
    ({"input_shape": (1, 0, 28)}, "compress.input_shape"),
    ({"layers": "dense"}, "compress.layers"),
])
def test_bad_options_name_themselves(kwargs, option):
    with pytest.raises(UserError, match=option):
        Prune(**kwargs)


def test_an_input_shape_that_does_not_fit_the_model_is_a_clear_error():
    with pytest.raises(UserError, match=r"compress.input_shape.*fails at conv1 \(Conv2d\)"):
        Prune(input_shape=(3, 32, 32))(LeNet5())


def test_a_model_with_no_traceable_part_stops_naming_what_was_tried(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace")
    monkeypatch.setattr("torch_pruning.DependencyGraph.build_dependency", refuse)
    with pytest.raises(UserError, match=r"could not trace LeNet5.*tried: conv1, conv2, fc1"):
        Prune()(LeNet5())


@pytest.mark.parametrize(("args", "expected"), [
    (["compress=prune", "compress.ratio=1"], ["compress.ratio", "[0, 1)"]),
    (["regularizer=lowrank_sgl", "regularizer.tau=2"], ["regularizer.tau", "[0, 1]"]),
])
def test_bad_input_on_the_command_line_is_one_message(tmp_path, args, expected):
    out = run_cli("train", *args, f"hydra.run.dir={tmp_path}", timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr + out.stdout
    assert all(text in out.stderr for text in expected), out.stderr
