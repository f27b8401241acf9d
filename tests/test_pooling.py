"""Max-pools off PyTorch's slow NCHW kernel: the same outputs bit for bit, the strided path
taken only eagerly on contiguous CPU tensors, one pooling op in exported graphs."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compaware.bench import inference_model
from compaware.export import export_model, freeze_torchscript, load_exported
from compaware.models.lenet import LeNet5
from compaware.pooling import MaxPool2d, strided_max_pool2d, swap_max_pools
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
        pooled = strided_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
        assert pooled.shape == expected.shape, (kernel, stride, padding, dilation, ceil_mode)
        torch.testing.assert_close(pooled, expected, rtol=0, atol=0, equal_nan=True)
        compared += 1
    assert compared > 100


def _pool_ops(forward, x: torch.Tensor) -> set[str]:
    with torch.inference_mode(), torch.profiler.profile() as profile:
        forward(x)
    return {event.key for event in profile.key_averages() if "max_pool" in event.key}


def test_the_inference_model_pools_strided_eagerly_and_as_one_op_when_exported(tmp_path):
    torch.manual_seed(0)
    model = LeNet5().eval()
    deployed = inference_model(model)
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
