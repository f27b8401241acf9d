"""The papers' architectures exactly, torchvision classifiers adapted to the data, and
models that do not fit the data stopping with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from compaware.config import CONF_DIR, UserError
from compaware.data import DataInfo
from compaware.deploy.bench import count_macs, count_params
from compaware.models import build_model
from compaware.models.cifar import SSLConvNet, resnet20, resnet32
from compaware.models.decomposeme import DecomposeMe
from compaware.models.lenet import MLP, LeNet5, LeNet300
from compaware.models.tv import check_size, torchvision_classifier
from compaware.residual import residual_blocks


@pytest.mark.parametrize(("factory", "params", "macs"), [
    (LeNet300, 266_610, 266_200),  # docs/papers.md
    (LeNet5, 431_080, 2_293_000),
])
def test_lenet_sizes_match_the_papers(factory, params, macs):
    model = factory()
    assert count_params(model) == params
    assert count_macs(model, (1, 28, 28)) == macs


def test_lenet5_mac_count_by_hand():
    # conv1: 20 filters of 1×5×5 at 24×24; conv2: 50 of 20×5×5 at 8×8; fc1 800→500; fc2 500→10
    by_hand = 20 * 25 * 24 * 24 + 50 * 20 * 25 * 8 * 8 + 800 * 500 + 500 * 10
    assert count_macs(LeNet5(), (1, 28, 28)) == by_hand


def test_lenet_adapts_to_other_shapes():
    model = LeNet5(in_channels=3, num_classes=7, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_classifier_adapts_channels_and_classes():
    model = torchvision_classifier("resnet18", in_channels=1, num_classes=10, image_size=32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert model.conv1.in_channels == 1


def test_unknown_torchvision_name_lists_close_matches():
    with pytest.raises(UserError, match="resnet18"):
        torchvision_classifier("resnet1")


def _weights(model) -> int:
    """Conv and linear weights (no biases, no BN): what the papers call weights."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@pytest.mark.parametrize(("factory", "weights", "params", "blocks"), [
    # 16·3·9 + 2·3·(2·16·16·9) … + 64·10 weights; option-B projections add 16·32 + 32·64
    (resnet20, 270_896, 272_474, 9),
    (resnet32, 464_432, 466_906, 15),
    # Caffe's cifar10_full: 32·3·25 + 32·32·25 + 64·32·25 + 64·4·4·10
    (SSLConvNet, 89_440, 89_578, 0),
])
def test_cifar_networks_sizes(factory, weights, params, blocks):
    model = factory()
    assert _weights(model) == weights and count_params(model) == params
    assert len(residual_blocks(model)) == blocks
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_convs_have_no_bias_and_shapes_halve_per_stage():
    model = resnet20()
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.stride,
            model.layer3[0].conv2.out_channels] == [16, (2, 2), 64]


def test_ssl_mlp_sizes():
    model = MLP(hidden=[500, 300])
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [500, 300, 10]
    assert count_params(model) == 784 * 500 + 500 + 500 * 300 + 300 + 300 * 10 + 10


@pytest.mark.parametrize(("name", "params", "macs"), [
    ("resnet50", 25_557_032, 4_089_184_256),  # torchvision's published figures
    ("alexnet", 61_100_840, 714_188_480),
])
def test_torchvision_counts_match_the_published_figures(name, params, macs):
    model = torchvision_classifier(name)  # 3×224×224, 1000 classes
    assert count_params(model) == params
    assert count_macs(model, (3, 224, 224)) == macs


def _one_d_convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(("preset", "width", "widths"), [
    ("dec8", 512, [64, 128, 256, 256, 512, 512, 512, 512]),
    ("dec8", 640, [80, 160, 320, 320, 640, 640, 640, 640]),
    ("dec8", 768, [96, 192, 384, 384, 768, 768, 768, 768]),
    ("dec3", 512, [64, 128, 512]),
])
def test_decomposeme_is_vertical_then_horizontal_1d_convs(preset, width, widths):
    model = DecomposeMe(preset, width, in_channels=1, num_classes=36, image_size=32)
    convs = _one_d_convs(model)
    assert len(convs) == 2 * len(widths)  # Dec8: 16 1D conv layers, Dec3: 6
    for i, (v, h) in enumerate(zip(convs[::2], convs[1::2], strict=True)):
        k = v.kernel_size[0]
        assert (v.kernel_size, h.kernel_size) == ((k, 1), (1, k))
        assert v.out_channels == h.out_channels == widths[i]
    names = [name for name, _ in model.named_children()]
    assert names[:4] == ["conv1v", "relu1v", "conv1h", "relu1h"]  # k×1 → ReLU → 1×k → ReLU
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 36)


def test_dec3_mac_count_by_hand():
    # 32×32×1: 5×1 and 1×5 convs of 64 at 32×32, pool; of 128 at 16×16, pool; 3×1 and 1×3
    # of 512 at 8×8; average pool; fc 512 → 36.
    by_hand = (1 * 64 * 5 + 64 * 64 * 5) * 32 * 32 + (64 * 128 * 5 + 128 * 128 * 5) * 16 * 16 \
        + (128 * 512 * 3 + 512 * 512 * 3) * 8 * 8 + 512 * 36
    model = DecomposeMe("dec3", in_channels=1, num_classes=36, image_size=32)
    assert count_macs(model, (1, 32, 32)) == by_hand


def test_decomposeme_widths_override_and_bad_widths():
    model = DecomposeMe("dec3", widths=[8, 16, 32], in_channels=1, num_classes=36)
    assert [c.out_channels for c in _one_d_convs(model)] == [8, 8, 16, 16, 32, 32]
    with pytest.raises(UserError, match="model.widths takes 3 integers"):
        DecomposeMe("dec3", widths=[8, 16])
    with pytest.raises(UserError, match="model.preset.*dec3, dec8"):
        DecomposeMe("dec5")


def test_batch_norm_follows_every_1d_conv():
    model = DecomposeMe("dec3", batch_norm=True, in_channels=1, num_classes=36)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(c.bias is None for c in _one_d_convs(model))


def _build(model: str, channels: int, size: int, **options) -> nn.Module:
    node = OmegaConf.load(Path(CONF_DIR) / "model" / f"{model}.yaml")
    node = OmegaConf.merge(node, options)
    return build_model(node, DataInfo("fashion_mnist", channels, size, 10, 100))


def test_a_model_that_does_not_fit_the_input_says_from_which_size_it_works():
    with pytest.raises(UserError, match=r"alexnet does not fit data=fashion_mnist \(1×28×28\)"
                       r".*at features\.\d+ \(MaxPool2d\).*data.image_size=63") as e:
        _build("alexnet", 1, 28)
    assert "Traceback" not in str(e.value)
    assert _build("alexnet", 1, 63)(torch.zeros(1, 1, 63, 63)).shape == (1, 10)
    with pytest.raises(UserError, match="data.image_size=32"):
        _build("decomposeme", 1, 16, preset="dec8")


def test_vision_transformers_are_built_for_the_data_size():
    model = torchvision_classifier("vit_b_32", in_channels=1, num_classes=10, image_size=64)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(("name", "size"), [("googlenet", 32), ("inception_v3", 75)])
def test_models_with_auxiliary_classifiers_return_plain_logits_when_training(name, size):
    model = torchvision_classifier(name, in_channels=1, num_classes=10, image_size=size).train()
    out = model(torch.randn(2, 1, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_inception_v3_names_the_smallest_size_it_takes():
    with pytest.raises(UserError, match="data.image_size=75"):
        _build("torchvision", 3, 74, name="inception_v3")


def test_vit_sizes_the_patches_do_not_divide_name_the_nearest_that_do():
    with pytest.raises(UserError, match=r"model.name=vit_b_32 cuts the image into 32×32 "
                       r"patches, which data.image_size=40 does not fit: set "
                       r"data.image_size=32 or data.image_size=64") as e:
        _build("torchvision", 3, 40, name="vit_b_32")
    assert "Traceback" not in str(e.value)


def test_maxvit_sizes_the_partitions_do_not_divide_name_the_nearest_that_do():
    with pytest.raises(UserError, match="7×7 attention partitions.*data.image_size=224 or "
                                        "data.image_size=445"):
        check_size("maxvit_t", 300)
    check_size("maxvit_t", 221)  # the stride-2 convs round up: 221 gives 224's block sizes
