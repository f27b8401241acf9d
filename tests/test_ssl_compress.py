"""compress=ssl: live-column convs and linears equal to the originals with fewer MACs,
zero residual branches removed with equal outputs, both standalone once exported; and
fine-tuning with the zero structure frozen."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from compaware import checkpoint
from compaware.compress import Prune, ShapeDepth
from compaware.compress.depth import remove_zero_branches
from compaware.compress.shape import LiveColumnConv2d, LiveInputLinear, drop_dead_columns
from compaware.config import UserError, instantiate
from compaware.data import DataInfo
from compaware.deploy.bench import count_macs, count_params
from compaware.deploy.export import export_model, load_exported
from compaware.deploy.fold import fold_batchnorm
from compaware.models import build_model
from compaware.models.cifar import resnet20
from compaware.models.lenet import LeNet5
from compaware.residual import branch_parameters, residual_blocks
from compaware.train import train
from tests.test_latency import FakeClock


def _kill_columns(layer: nn.Module, fraction: float, seed: int = 0) -> torch.Tensor:
    """Zero a random ``fraction`` of the layer's weight columns; return the live ones."""
    w = layer.weight.detach().flatten(1)
    order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.weight.view(w.shape)[:, order[: int(fraction * w.shape[1])]] = 0
    return order[int(fraction * w.shape[1]):].sort().values


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 8, 3, padding=1),
    nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1)),
    nn.Conv2d(5, 7, 1, bias=False),
    nn.Conv2d(2, 4, 5, stride=3),
])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_live_column_conv_equals_the_conv(conv, batch, memory_format):
    live = _kill_columns(conv, 0.6)
    x = torch.randn(batch, conv.in_channels, 17, 14).contiguous(memory_format=memory_format)
    out = LiveColumnConv2d(conv, live)(x)
    torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the GEMM's NHWC, no copy


def test_the_gather_index_is_kept_per_input_size_and_never_from_a_trace():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = LiveColumnConv2d(conv, _kill_columns(conv, 0.5))
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:  # what tracers run on
        layer(fake.from_tensor(torch.randn(2, 3, 8, 8)))
    assert layer.indices == {}  # a fake index kept would make the next real output fake
    program = torch.export.export(layer, (torch.randn(2, 3, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(program.module()(x), conv(x), atol=1e-5, rtol=1e-4)
    for size in (8, 6, 8):
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-4)
    assert len(layer.indices) == 2


def test_live_input_linear_equals_the_linear():
    linear = nn.Linear(20, 6)
    live = _kill_columns(linear, 0.5)
    x = torch.randn(4, 20)
    torch.testing.assert_close(LiveInputLinear(linear, live)(x), linear(x))


def test_a_conv_with_no_live_column_outputs_its_bias():
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight.zero_()
    out = LiveColumnConv2d(conv, torch.empty(0, dtype=torch.long))(torch.randn(2, 2, 6, 6))
    torch.testing.assert_close(out, conv.bias.detach().view(1, 3, 1, 1).expand(2, 3, 4, 4))


def _shape_sparse_lenet() -> tuple[nn.Module, dict[str, int]]:
    torch.manual_seed(0)
    model = LeNet5()
    live = {"conv1": len(_kill_columns(model.conv1, 18 / 25)),  # 25 → 7 (SSL's Table 2)
            "conv2": len(_kill_columns(model.conv2, 0.9)),
            "fc1": len(_kill_columns(model.fc1, 0.5))}
    return model, live


def test_shape_sparse_lenet_keeps_its_outputs_with_fewer_macs_counted_by_hand():
    model, live = _shape_sparse_lenet()
    compressed, report = ShapeDepth()(model)
    assert report["conv1"] == {"columns": 25, "live_columns": 7, "replaced": True}
    assert report["fc2"] == {"columns": 500, "live_columns": 500, "replaced": False}
    assert isinstance(compressed.conv1, LiveColumnConv2d) and isinstance(model.conv1, nn.Conv2d)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=1e-4)
    # MACs: the GEMMs only, N × live columns × output positions; unfold and gather are free
    by_hand = (20 * live["conv1"] * 24 * 24 + 50 * live["conv2"] * 8 * 8
               + 500 * live["fc1"] + 500 * 10)
    assert count_macs(compressed, (1, 28, 28)) == by_hand
    assert count_params(compressed) < count_params(model)


def test_min_sparsity_keeps_nearly_dense_layers():
    model, _ = _shape_sparse_lenet()  # conv1 72%, conv2 90%, fc1 50% of the columns dead
    compressed, report = ShapeDepth(min_sparsity=0.6)(model)
    assert [name for name, r in report.items() if r["replaced"]] == ["conv1", "conv2"]
    assert "below min_sparsity" in report["fc1"]["reason"]
    assert isinstance(compressed.fc1, nn.Linear)


def test_shape_compressed_model_exports_and_reloads(tmp_path):
    model, _ = _shape_sparse_lenet()
    compressed, _ = ShapeDepth()(model)
    compressed.eval()
    export_model(compressed, torch.zeros(2, 1, 28, 28), tmp_path / "m.pt2")
    x = torch.randn(7, 1, 28, 28)  # another batch size: the batch dimension stays dynamic
    torch.testing.assert_close(load_exported(tmp_path / "m.pt2")(x), compressed(x))


def test_unsupported_layers_are_reported_and_left_alone():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"))
    for layer in model:
        _kill_columns(layer, 0.5)
    report = drop_dead_columns(model, list(model.named_children()))
    assert report["0"]["reason"] == "grouped conv" and not report["1"]["replaced"]
    assert all(isinstance(m, nn.Conv2d) for m in model)


def _zero_branches(model: nn.Module, names: list[str]) -> None:
    blocks = dict(residual_blocks(model))
    with torch.no_grad():
        for name in names:
            for p in branch_parameters(blocks[name]):
                p.zero_()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_zero_branches_are_removed_with_equal_outputs(mode):
    torch.manual_seed(0)
    model = resnet20()
    model.train()
    model(torch.randn(8, 3, 32, 32))  # non-trivial BN running statistics
    _zero_branches(model, ["layer1.1", "layer2.0", "layer3.2"])  # layer2.0 has a projection
    model.train(mode == "train")
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    compressed, report = ShapeDepth()(model)
    assert [n for n, r in report.items() if r.get("removed")] == ["layer1.1", "layer2.0",
                                                                    "layer3.2"]
    assert len(residual_blocks(compressed)) == 6
    assert isinstance(compressed.layer1[1], nn.ReLU)
    assert isinstance(compressed.layer2[0][0][0], nn.Conv2d)  # its projection stays
    torch.testing.assert_close(compressed(x), expected)
    assert count_macs(compressed, (3, 32, 32)) < count_macs(model, (3, 32, 32))


def test_only_a_zero_last_bn_makes_a_branch_removable():
    model = resnet20()
    with torch.no_grad():
        model.layer1[0].conv2.weight.zero_()  # the BN after it still outputs β
    assert not any(r["removed"] for r in remove_zero_branches(model).values())


def _lenet_with_zero_groups(path) -> None:
    torch.manual_seed(0)
    model = LeNet5()
    with torch.no_grad():
        model.conv2.weight[:10] = 0  # 10 filters
        model.conv2.bias[:10] = 0
        model.conv2.weight[:, :5] = 0  # 5 channels
        model.fc1.weight[:, 100:300] = 0  # 200 input columns
    checkpoint.save({"model": model.state_dict()}, path)


@pytest.mark.parametrize("mask", [True, False])
def test_finetuning_with_the_mask_keeps_zero_groups_zero(make_cfg, tmp_path, mask):
    _lenet_with_zero_groups(tmp_path / "sparse.pt")
    train(make_cfg(f"init_from={tmp_path / 'sparse.pt'}", "schedule.epochs=0",
                   "compress=none", f"schedule.finetune_mask={mask}", "bench.latency=false"))
    tuned = checkpoint.load(tmp_path / "run" / "checkpoints" / "finetune.pt")["model"]
    zero_groups = [tuned["conv2.weight"][:10], tuned["conv2.bias"][:10],
                   tuned["conv2.weight"][:, :5], tuned["fc1.weight"][:, 100:300]]
    assert all(bool((group == 0).all()) == mask for group in zero_groups)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["accuracy"]["finetuned"] is not None


def test_resnet20_depth_ssl_run_removes_the_zero_blocks(make_cfg, tmp_path):
    results = train(make_cfg(
        "model=resnet20", "data=synthetic", "data.image_size=8", "regularizer=ssl",
        "regularizer.filter=0", "regularizer.channel=0", "regularizer.depth=50",
        "regularizer.method=proximal", "compress=ssl", "schedule.finetune_epochs=0",
        "schedule.strength_ramp=0", "bench.latency=false"))  # 4 steps at full strength
    removed = [name for name, r in results["compression"]["details"].items() if r.get("removed")]
    assert len(removed) == results["regularizer"]["zero_blocks"] > 0
    assert results["accuracy"]["compressed"] == results["accuracy"]["dense"]
    assert results["params"]["compressed"] < results["params"]["dense"]
    assert "filter_sparsity/layer1.0.conv1" in results["regularizer"]


@pytest.mark.parametrize("experiment", ["wen2016_lenet_fashion_cpu",
                                        "wen2016_lenet_shape_fashion_cpu",
                                        "wen2016_resnet20_synthetic_cpu"])
def test_ssl_experiments_build_and_their_groups_find_layers(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}")
    model = build_model(cfg.model, DataInfo("x", cfg.data.channels, cfg.data.image_size,
                                            cfg.data.num_classes, 1))
    assert instantiate(cfg.regularizer, "regularizer").penalty(model) > 0
    instantiate(cfg.compress, "compress")(model)


def test_the_shape_experiment_runs_end_to_end(make_cfg):
    results = train(make_cfg("experiment=wen2016_lenet_shape_fashion_cpu", "data=synthetic",
                             "schedule.pretrain_epochs=0", "bench.latency=false"))
    assert results["config"]["data"]["name"] == "synthetic"
    assert set(results["compression"]["details"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert "shape_sparsity/conv2" in results["regularizer"]


def test_prune_removes_filters_channels_shapes_and_blocks_together():
    """SSL's four structures all become real in one `compress=prune`, outputs unchanged."""
    torch.manual_seed(0)
    model = LeNet5()
    with torch.no_grad():
        model.conv1.weight[:5] = 0  # filter-wise: 5 of conv1's 20 filters (with their bias)
        model.conv1.bias[:5] = 0
        model.conv2.weight[:, 5:12] = 0  # channel-wise: conv2 reads 7 of conv1's channels no more
        model.conv2.weight[:, :, :, :2] = 0  # shape-wise: 2 of 5 kernel columns everywhere
    x = torch.randn(4, 1, 28, 28)
    compressed, report = Prune(input_shape=(1, 28, 28), min_sparsity=0.3)(model)
    assert report["conv1"]["kept"] == 20 - 5 - 7  # dead writers and dead readers both go
    assert report["conv2"]["replaced"] and report["conv2"]["live_columns"] == 8 * 3 * 5
    torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=1e-4)
    by_hand = 8 * 25 * 24 * 24 + 50 * (8 * 15) * 8 * 8 + 800 * 500 + 500 * 10
    assert count_macs(compressed, (1, 28, 28)) == by_hand

    torch.manual_seed(0)
    resnet = resnet20()
    resnet.train()
    resnet(torch.randn(8, 3, 32, 32))  # non-trivial BN running statistics
    _zero_branches(resnet, ["layer1.1", "layer3.2"])
    resnet.eval()
    x = torch.randn(2, 3, 32, 32)
    compressed, report = Prune(input_shape=(3, 32, 32))(resnet)
    assert [n for n, r in report.items() if r.get("removed")] == ["layer1.1", "layer3.2"]
    torch.testing.assert_close(compressed(x), resnet(x), atol=1e-5, rtol=1e-4)


def test_latency_aware_shape_step_keeps_a_live_column_layer_only_where_it_is_faster():
    """On a clock where a live-column conv costs 5× its parameters, conv1 (7 of 25 columns
    live: 3.6× fewer parameters) stays a conv, conv2 (10 %: 10×) and fc1 (a live-input linear
    costs its parameters) are replaced."""
    model, _ = _shape_sparse_lenet()
    shape_step = ShapeDepth(latency_aware=True, latency_batch=2, input_shape=(1, 28, 28))
    slow = FakeClock(lambda layer: isinstance(layer, LiveColumnConv2d), 5)
    compressed, report = shape_step(model, timer=slow)
    assert isinstance(compressed.conv1, nn.Conv2d)
    assert report["conv1"]["reason"] == "not faster when timed"
    assert not report["conv1"]["replaced"] and report["conv1"]["live_columns"] == 7
    assert isinstance(compressed.conv2, LiveColumnConv2d)
    assert isinstance(compressed.fc1, LiveInputLinear)
    timed = report["conv2"]["latency_ms"]
    assert timed["live_columns"] < timed["layer"]
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=1e-4)


def test_latency_aware_shape_step_needs_the_input_shape():
    with pytest.raises(UserError, match="compress.input_shape"):
        ShapeDepth(latency_aware=True)


def test_batchnorm_folds_into_live_column_layers_too():
    """fx keeps a live-column layer as one call (its forward does shape arithmetic fx cannot
    trace), so a compressed ResNet still folds every BatchNorm, the live-column convs' too."""
    torch.manual_seed(0)
    model = resnet20()
    for name in ("layer1.0.conv1", "layer2.1.conv2"):
        _kill_columns(model.get_submodule(name), 0.75)
    with torch.no_grad():  # non-trivial statistics, so that folding changes the weights
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    compressed, _ = ShapeDepth()(model.eval())
    assert isinstance(compressed.get_submodule("layer2.1.conv2"), LiveColumnConv2d)
    folded, count = fold_batchnorm(compressed)
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in compressed.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(folded(x), compressed(x), atol=1e-4, rtol=1e-4)


def test_batchnorm_folds_into_a_live_input_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU())
    _kill_columns(model[0], 0.5)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    compressed, _ = ShapeDepth()(model.eval())
    assert isinstance(compressed[0], LiveInputLinear)
    folded, count = fold_batchnorm(compressed)
    assert count == 1 and isinstance(folded[1], nn.Identity)
    x = torch.randn(4, 8)
    torch.testing.assert_close(folded(x), compressed(x), atol=1e-5, rtol=1e-5)
