"""SSL's group lasso: the groups and their norms by hand, the official subgradient (zero at a
zero group, no NaN) and zeroing, the proximal variant in closed form, clear errors, stats,
and that training really zeroes filters, channels, shapes and residual branches."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from compaware import native
from compaware.compress.depth import remove_zero_branches
from compaware.config import DataConfig, ScheduleConfig, UserError
from compaware.data import build_data
from compaware.loop import Stage, fit
from compaware.models.cifar import resnet20
from compaware.models.lenet import LeNet5
from compaware.native import group_sums as native_group_sums
from compaware.regularizers import SSL
from compaware.residual import branch_parameters, residual_blocks


@pytest.fixture
def native_kernels():
    """native_kernels=true for one test."""
    native.use(True)
    yield
    native.use(False)


def _conv_model(weight: torch.Tensor) -> nn.Sequential:
    """A conv with the given weight (no bias) and a classifier the default selection skips."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2))


def test_group_norms_and_penalty_by_hand():
    w = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2)  # N=2, C=2, 2×2 kernels
    model = _conv_model(w)
    filters = [w[n].norm() for n in range(2)]
    channels = [w[:, c].norm() for c in range(2)]
    shapes = [w[:, c, h, k].norm() for c in range(2) for h in range(2) for k in range(2)]
    for kind, expected in (("filter", filters), ("channel", channels), ("shape", shapes)):
        reg = SSL(**{kind: 0.5}, lam=2.0)
        (family,) = reg.families(model, (kind,))
        torch.testing.assert_close(family.norms().flatten(), torch.stack(expected))
        assert reg.penalty(model).item() == pytest.approx(2.0 * 0.5 * float(sum(expected)))


def test_linear_rows_are_filters_and_columns_are_channels():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2))
    reg = SSL(filter=1, channel=1, shape=1)
    filters, channels, shapes = reg.families(model)
    w = model[0].weight
    torch.testing.assert_close(filters.norms(), w.norm(dim=1))
    torch.testing.assert_close(channels.norms(), w.norm(dim=0))
    torch.testing.assert_close(shapes.norms(), w.norm(dim=0))


def test_subgradient_is_the_official_one_and_zero_at_a_zero_group():
    w = torch.randn(3, 2, 3, 3)
    w[1] = 0  # an all-zero filter
    model = _conv_model(w)
    reg = SSL(filter=0.1)
    reg.penalty(model)
    reg.after_backward(model)
    grad = model[0].weight.grad
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    for n in (0, 2):  # λ · w / ‖w_g‖
        torch.testing.assert_close(grad[n], 0.1 * w[n] / w[n].norm())


def test_subgradient_added_after_backward_is_autograd_of_the_group_lasso():
    """All three kinds on a conv (with a zero filter) and a linear layer: what
    ``after_backward`` adds to the gradients is autograd's gradient of the hand-written sum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0
    reg = SSL(filter=0.3, channel=0.2, shape=0.1, lam=2.0)
    conv, linear = model[0], model[2]
    expected = 0.0
    for layer in (conv, linear):
        w = layer.weight.flatten(2) if layer.weight.dim() == 4 else layer.weight[..., None]
        rows = (w.pow(2).sum((1, 2)) + layer.bias.pow(2)).sqrt()
        expected = expected + 2.0 * (0.3 * rows.sum() + 0.2 * w.norm(dim=(0, 2)).sum()
                                     + 0.1 * w.norm(dim=0).sum())
    params = [conv.weight, conv.bias, linear.weight, linear.bias]
    # the zero filter's norm has no gradient at 0: autograd's is NaN there, SSL's is 0
    reference = [torch.nan_to_num(g, nan=0.0) for g in torch.autograd.grad(expected, params)]
    before = [torch.randn_like(p) for p in params]
    for p, g in zip(params, before, strict=True):
        p.grad = g.clone()
    value = reg.penalty(model)
    reg.after_backward(model)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    for p, g, r in zip(params, before, reference, strict=True):
        torch.testing.assert_close(p.grad, g + r)


def _penalty_and_gradients(model: nn.Module, reg: SSL) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    value = reg.penalty(model)
    reg.after_backward(model)
    return [value] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the C kernel")
@pytest.mark.parametrize("channels_last", [False, True], ids=["all-c", "one-channels-last"])
def test_c_kernel_gives_torch_s_sums_and_subgradient(channels_last, torch_threads,
                                                     native_kernels):
    """3×3, 1×1 and linear weights, biases, a BatchNorm in a depth group, a zero filter: the
    C kernel's passes, shared among three threads, equal torch's; with a channels-last
    (non-contiguous) weight, which takes torch's code, one after the other."""
    torch_threads(3)
    torch.manual_seed(0)
    model = resnet20()
    if channels_last:
        model.conv1.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.layer1[0].conv1.weight[3] = 0
    reg = SSL(filter=0.3, channel=0.2, shape=0.1, depth=0.05, skip_last=False)
    by_c = _penalty_and_gradients(model, reg)
    assert native_group_sums._kernel() is not None  # the C kernel ran, not its fallback
    native.use(False)
    for got, expected in zip(by_c, _penalty_and_gradients(model, reg), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_without_a_c_compiler_the_group_sums_fall_back(monkeypatch, caplog, tmp_path,
                                                       native_kernels):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 2, 5, 5))
    reg = SSL(filter=0.1, channel=0.1, shape=0.1)
    expected = _penalty_and_gradients(model, reg)
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    native_group_sums._kernel.cache_clear()
    try:
        for got, want in zip(_penalty_and_gradients(model, reg), expected, strict=True):
            torch.testing.assert_close(got, want)
    finally:
        native_group_sums._kernel.cache_clear()  # the next test builds with the real compiler
    assert "C kernel group_sums.c is unavailable here" in caplog.text
    assert "no-such-cc" in caplog.text


def test_filter_group_holds_the_bias_unless_told_otherwise():
    layer = nn.Conv2d(2, 3, 3)
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2))
    (with_bias,) = SSL(filter=1).families(model, ("filter",))
    (without,) = SSL(filter=1, filter_bias=False).families(model, ("filter",))
    w, b = layer.weight.detach(), layer.bias.detach()
    torch.testing.assert_close(with_bias.norms(), (w.flatten(1).pow(2).sum(1) + b**2).sqrt())
    torch.testing.assert_close(without.norms(), w.flatten(1).norm(dim=1))


def test_prox_is_group_soft_thresholding_then_zeroing():
    # three filters with norms 5, 0.5 and 1e-4
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [6e-5, 8e-5]]).reshape(3, 2, 1, 1)
    model = _conv_model(w)
    SSL(filter=1.0, method="proximal").prox(model, step=1.0)  # threshold 1
    out = model[0].weight.detach().flatten(1)
    torch.testing.assert_close(out[0], torch.tensor([3.0, 4.0]) * (1 - 1 / 5))
    assert torch.equal(out[1:], torch.zeros(2, 2))  # norm ≤ threshold: the whole group is 0


def test_subgradient_prox_only_zeroes_weights_below_the_threshold():
    w = torch.tensor([5e-5, -9e-5, 2e-4, -1.0]).reshape(2, 2, 1, 1)
    model = _conv_model(w)
    reg = SSL(shape=1.0)  # method=subgradient: prox is the official zeroing
    reg.prox(model, step=1.0)
    assert model[0].weight.flatten().tolist() == pytest.approx([0, 0, 2e-4, -1.0])


def test_zeroing_leaves_layers_without_an_active_group_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.fill_(1e-5)
    SSL(filter=1.0, layers="conv").prox(model, step=0.0)
    assert torch.equal(model[0].weight, torch.zeros_like(model[0].weight))
    assert torch.all(model[2].weight == 1e-5)


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"filter": -1}, "regularizer.filter"),
    ({"depth": "a lot"}, "regularizer.depth"),
    ({"method": "admm"}, "regularizer.method"),
    ({"every": "batch"}, "regularizer.every"),
    ({"zero_threshold": -1e-4}, "regularizer.zero_threshold"),
    ({"layers": "convs"}, "regularizer.layers"),
])
def test_bad_options_name_themselves(kwargs, option):
    with pytest.raises(UserError, match=option):
        SSL(**kwargs)


def test_depth_on_a_model_without_residual_blocks_stops_clearly():
    with pytest.raises(UserError, match=r"regularizer.depth=0.1 needs residual blocks.*LeNet5"):
        SSL(depth=0.1).penalty(LeNet5())


def test_a_selection_without_layers_stops_clearly():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(UserError, match="selects no layer"):
        SSL(filter=0.1, layers="linear").penalty(model)  # the only linear is the last


def test_stats_report_sparsity_per_layer_and_zero_blocks():
    model = resnet20()
    with torch.no_grad():
        model.conv1.weight[:4] = 0  # 4 of 16 filters
        model.conv1.weight[:, 1] = 0  # 1 of 3 channels
        for p in branch_parameters(model.layer2[1]):
            p.zero_()
    stats = SSL().stats(model)
    assert stats["filter_sparsity/conv1"] == 4 / 16
    assert stats["channel_sparsity/conv1"] == pytest.approx(1 / 3)
    assert stats["shape_sparsity/conv1"] == pytest.approx(9 / 27)
    assert stats["filter_sparsity/layer2.1.conv2"] == 1.0  # its branch was zeroed
    assert stats["filter_sparsity/layer2.2.conv2"] == 0.0
    assert stats["zero_blocks"] == 1
    assert "filter_sparsity/fc" not in stats  # skip_last
    assert "zero_blocks" not in SSL().stats(LeNet5())


def _train(model: nn.Module, regularizer: SSL, tmp_path, epochs: int, lr: float,
           **data) -> None:
    torch.manual_seed(0)
    fit(model, build_data(DataConfig(**data)), Stage("train", epochs, lr, regularizer),
        ScheduleConfig(epochs=epochs, lr=lr, batch_size=32), seed=0,
        device=torch.device("cpu"), checkpoint_path=tmp_path / "ckpt.pt",
        writer=SummaryWriter(str(tmp_path / "tb")), resume=False, meta={})


# The official subgradient reaches exact zeros only where lr·λ is small next to the zeroing
# threshold (else the groups oscillate around 0), so it needs more, smaller steps.
@pytest.mark.parametrize(("method", "lam", "lr", "train_size"), [
    ("subgradient", 0.05, 0.01, 2048),
    ("proximal", 0.5, 0.05, 256),
])
def test_training_zeroes_filters_channels_and_shapes(tmp_path, method, lam, lr, train_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 12 * 12, 10))
    reg = SSL(filter=lam, channel=lam, shape=lam, method=method)
    _train(model, reg, tmp_path, epochs=4, lr=lr, name="synthetic", image_size=16,
           train_size=train_size, test_size=64)
    stats = reg.stats(model)
    assert stats["filter_sparsity/0"] > 0 and stats["channel_sparsity/2"] > 0
    assert stats["shape_sparsity/2"] >= stats["channel_sparsity/2"]
    weight = model[2].weight
    assert (weight.flatten(1).abs().sum(0) == 0).float().mean() == stats["shape_sparsity/2"]


def test_depth_ssl_removes_blocks_of_resnet20_with_equal_outputs(tmp_path):
    model = resnet20(in_channels=1)
    reg = SSL(filter=0, channel=0, depth=50.0, method="proximal")
    _train(model, reg, tmp_path, epochs=2, lr=0.05, name="synthetic", image_size=8,
           train_size=128, test_size=32)
    zero_blocks = reg.stats(model)["zero_blocks"]
    assert zero_blocks >= 1
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    dense = model(x)
    report = remove_zero_branches(model)
    assert sum(r["removed"] for r in report.values()) == zero_blocks
    assert len(residual_blocks(model)) == 9 - zero_blocks
    torch.testing.assert_close(model(x), dense)
