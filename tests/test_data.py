"""Datasets: the embedded default, synthetic data, IDX files, and clear messages when missing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from compaware.config import DataConfig, UserError
from compaware.data import DEBIAN_FASHION_MNIST, _read_idx, build_data, train_loader


def test_digits_is_embedded_upscaled_and_split_the_same_way_every_time():
    first, second = build_data(DataConfig()), build_data(DataConfig())
    assert (len(first.train), len(first.test)) == (1437, 360)
    x, y = first.train[0]
    assert x.shape == (1, 28, 28) and 0 <= int(y) < 10
    assert torch.equal(first.test.tensors[1], second.test.tensors[1])


def test_limit_keeps_the_first_samples():
    data = build_data(DataConfig(limit=100))
    assert len(data.train) == 100 and data.info.train_size == 100


def test_train_order_depends_only_on_seed_and_epoch():
    data = build_data(DataConfig(limit=64))
    batch = lambda epoch: next(iter(train_loader(data, 16, seed=0, epoch=epoch)))[1]  # noqa: E731
    assert torch.equal(batch(3), batch(3))
    assert not torch.equal(batch(3), batch(4))


def test_synthetic_has_the_configured_shape():
    data = build_data(DataConfig(name="synthetic", channels=3, image_size=16, num_classes=5,
                                 train_size=40, test_size=10))
    x, _ = data.train[0]
    assert x.shape == (3, 16, 16) and len(data.test) == 10 and data.info.num_classes == 5


def test_real_data_rejects_other_channels():
    with pytest.raises(UserError, match="data.channels"):
        build_data(DataConfig(channels=3))


def test_unknown_dataset_names_the_choices():
    with pytest.raises(UserError, match="digits.*synthetic"):
        build_data(DataConfig(name="nope"))


def test_missing_idx_files_say_where_we_looked(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)) as e:
        build_data(DataConfig(name="mnist", root=str(tmp_path)))
    assert "data.root" in str(e.value)


@pytest.mark.parametrize("compressed", [True, False])
def test_idx_reader(tmp_path: Path, compressed: bool):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    raw += images.tobytes()
    path = tmp_path / ("x.gz" if compressed else "x")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    assert np.array_equal(_read_idx(path), images)


@pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_from_debian():
    data = build_data(DataConfig(name="fashion_mnist", limit=500))
    assert len(data.train) == 500 and len(data.test) == 10_000
    assert data.train[0][0].shape == (1, 28, 28)
