"""Max-pools off PyTorch's slow NCHW kernel: the same outputs bit for bit, the strided path
taken only eagerly on contiguous CPU tensors, one pooling op in exported graphs, and only in
the strided_pools form: the benchmark times what it exports unless that form is asked for."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compaware.config import BenchConfig
from compaware.deploy import bench
from compaware.deploy.bench import inference_model, strided_pools_model
from compaware.deploy.export import export_model, freeze_torchscript, load_exported
from compaware.deploy.pooling import MaxPool2d, strided_max_pool2d, swap_max_pools
from compaware.models.lenet import LeNet5
from tests.test_prune import _resnet

SETTINGS = [(kernel, stride, padding, dilation, ceil_mode) for kernel, stride, padding, dilation,
            ceil_mode in itertools.product([1, 2, 3, (2, 3)], [None, 1, 2, (1, 3)], [0, 1],
                                           [1, 2], [False, True])
            if 2 * padding <= min(nn.modules.utils._pair(kernel))]


@pytest.mark.parametrize("size", [(8, 8), (7, 12), (17, 17)])
def test_strided_max_pool_is_max_pool2d_bit_for_bit(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    x[0, 1, 3, 4] = float("nan")  # propagates in both
    compared = 0
    for kernel, stride, padding, dilation, ceil_mode in SETTINGS:
        try:
            expected = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
        except RuntimeError:  # an output size below 1: PyTorch refuses the setting
            continue
        pooled = strided_max_pool2d(x, kernel, stride=stride, padding=padding,
                                    dilation=dilation, ceil_mode=ceil_mode)
        assert pooled.shape == expected.shape, (kernel, stride, padding, dilation, ceil_mode)
        torch.testing.assert_close(pooled, expected, rtol=0, atol=0, equal_nan=True)
        compared += 1
    assert compared > 100


def _pool_ops(forward, x: torch.Tensor) -> set[str]:
    with torch.inference_mode(), torch.profiler.profile() as profile:
        forward(x)
    return {event.key for event in profile.key_averages() if "max_pool" in event.key}


def test_the_strided_pools_form_pools_strided_eagerly_and_as_one_op_when_exported(tmp_path):
    torch.manual_seed(0)
    model = LeNet5().eval()
    assert not any(type(m) is MaxPool2d for m in inference_model(model).modules())  # eager
    deployed = strided_pools_model(inference_model(model))
    assert [type(m) for m in deployed.modules() if isinstance(m, nn.MaxPool2d)] == [MaxPool2d] * 2
    assert type(model.pool1) is nn.MaxPool2d  # a copy was changed
    x = torch.randn(8, 1, 28, 28)  # pool2 reads 8 × 50 × 8 × 8 ≥ STRIDED_FROM elements
    with torch.inference_mode():
        torch.testing.assert_close(deployed(x), model(x), rtol=0, atol=0)
    assert _pool_ops(deployed, x) == set()  # NCHW, eager: maxima of strided views
    nhwc = torch.randn(8, 20, 24, 24).contiguous(memory_format=torch.channels_last)
    assert _pool_ops(deployed.pool1, nhwc)  # NHWC: PyTorch's own kernel, vectorised there
    assert _pool_ops(deployed, x[:1])  # batch 1: pool2's 3200 elements, PyTorch's as fast
    assert _pool_ops(freeze_torchscript(deployed, x), x) == set()  # TorchScript runs eager ops
    export_model(deployed, x, tmp_path / "m.pt2")  # what a run writes: one pool op per pool
    loaded = load_exported(tmp_path / "m.pt2")
    pools = [n for n in loaded.graph.nodes if "max_pool2d" in str(n.target)]
    assert len(pools) == 2
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_swapping_keeps_each_pools_settings_and_leaves_indices_to_pytorch():
    model = _resnet()  # its stem pool: 3×3, stride 2, padding 1
    assert swap_max_pools(model) == 1
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    with_indices = MaxPool2d(2, return_indices=True)
    pooled, indices = with_indices(torch.randn(1, 2, 4, 4))
    assert indices.dtype == torch.int64 and pooled.shape == (1, 2, 2, 2)


def _timed_and_exported(monkeypatch, tmp_path, cfg: BenchConfig) -> tuple[list, list, dict]:
    """bench.measure of two LeNet-5s under ``cfg``: the modules it exported, the forward
    functions it timed (on a fake clock), and its latency_ms."""
    exported, timed = [], []
    export = bench.export_model

    def record_export(model, example, path):
        exported.append(model)
        return export(model, example, path)

    def record_timing(forward, batch, min_run_time, threads):
        timed.append(forward)
        return 1.0

    monkeypatch.setattr(bench, "export_model", record_export)
    monkeypatch.setattr(bench, "median_ms", record_timing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    models = {"dense": LeNet5(), "compressed": LeNet5()}
    costs = bench.measure(models, (1, 28, 28), cfg, tmp_path)
    return exported, timed, costs["latency_ms"]


def _strided(forward) -> bool:
    return isinstance(forward, nn.Module) and any(type(m) is MaxPool2d
                                                  for m in forward.modules())


def test_the_default_benchmark_times_the_very_model_it_exports(monkeypatch, tmp_path):
    exported, timed, latency = _timed_and_exported(monkeypatch, tmp_path, BenchConfig())
    assert len(exported) == 2 and len(timed) == 4  # each model at batch 1 and batch N
    assert all(any(forward is model for model in exported) for forward in timed)
    assert not any(_strided(forward) for forward in timed)  # no pool swapped in silently
    assert latency["eager"] is not None and latency["strided_pools"] is None


def test_strided_pools_are_timed_only_when_asked_for(monkeypatch, tmp_path):
    cfg = BenchConfig(forms=["eager", "strided_pools"], fastest=True)
    exported, timed, latency = _timed_and_exported(monkeypatch, tmp_path, cfg)
    eager, strided = timed[:4], timed[4:]
    assert all(any(forward is model for model in exported) for forward in eager)
    assert not any(_strided(forward) for forward in eager)
    assert len(strided) == 4 and all(_strided(forward) for forward in strided)
    assert not any(_strided(model) for model in exported)  # the files keep nn.MaxPool2d
    assert latency["strided_pools"]["batch_N"] == {"dense": 1.0, "compressed": 1.0}
    assert set(latency["fastest"]["forms"]["batch_1"].values()) <= {"eager", "strided_pools"}
