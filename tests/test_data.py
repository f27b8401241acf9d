"""Datasets: the embedded default, synthetic data, IDX files, and clear messages when missing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


ICDAR_CLASSES = list("0123456789abcdefghijklmnopqrstuvwxyz")


def _image_tree(root: Path, classes: dict[str, list[str]]) -> None:
    """Two small colour PNGs per class and split, of a size other than 32×32."""
    for split, names in classes.items():
        for i, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for j in range(2):
                pixels = np.full((24, 40, 3), (7 * i + j) % 256, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{j}.png")


def test_icdar_reads_an_image_folder_tree_as_gray_32x32(make_cfg, tmp_path):
    _image_tree(tmp_path / "icdar", {"train": ICDAR_CLASSES, "test": ICDAR_CLASSES})
    data = build_data(make_cfg("data=icdar", f"data.root={tmp_path / 'icdar'}").data)
    assert (len(data.train), len(data.test), data.info.num_classes) == (72, 72, 36)
    x, y = data.train[2]
    assert x.shape == (1, 32, 32) and int(y) == 1  # second class folder, "1"


def test_icdar_missing_or_inconsistent_trees_say_what_is_wrong(make_cfg, tmp_path):
    with pytest.raises(UserError, match=r"data=icdar: the ImageFolder tree 'train/<class>/"
                                        r"<image>' not found at .*nowhere/train.*data.root"):
        build_data(make_cfg("data=icdar", f"data.root={tmp_path / 'nowhere'}").data)
    _image_tree(tmp_path / "odd", {"train": ICDAR_CLASSES, "test": ICDAR_CLASSES[:10]})
    with pytest.raises(UserError, match="different class folders"):
        build_data(make_cfg("data=icdar", f"data.root={tmp_path / 'odd'}").data)
    _image_tree(tmp_path / "digits", {"train": ICDAR_CLASSES[:10], "test": ICDAR_CLASSES[:10]})
    with pytest.raises(UserError, match="10 classes.*data.num_classes=36"):
        build_data(make_cfg("data=icdar", f"data.root={tmp_path / 'digits'}").data)


def _own_images(root: Path, mode: str = "RGB", test_split: str = "val",
                classes: tuple[str, ...] = ("cat", "dog", "fox")) -> Path:
    """A tiny ImageFolder tree: per class, 4 training and 2 test PNGs of 20×30 pixels in
    PIL ``mode``, each class a brightness of its own (learnable) plus noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), (test_split, 2)):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(count):
                pixels = np.clip(60 * i + rng.integers(0, 40, (20, 30, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(
                    root / split / name / f"{j}.png")
    return root


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_imagefolder_infers_classes_and_channels_from_the_images(make_cfg, tmp_path, mode,
                                                                channels):
    root = _own_images(tmp_path / "own", mode)
    data = build_data(make_cfg("data=imagefolder", f"data.root={root}", "data.image_size=16").data)
    assert (data.info.channels, data.info.num_classes) == (channels, 3)
    assert (len(data.train), len(data.test)) == (12, 6)
    x, y = data.train[4]
    assert x.shape == (channels, 16, 16) and int(y) == 1  # the second class folder, "dog"
    assert -1 <= x.min() and x.max() <= 1


def test_imagefolder_channels_option_reads_colour_as_gray_and_test_replaces_val(make_cfg,
                                                                                 tmp_path):
    root = _own_images(tmp_path / "own", "RGB", test_split="test")
    data = build_data(make_cfg("data=imagefolder", f"data.root={root}", "data.channels=1",
                               "data.image_size=8").data)
    assert data.info.channels == 1 and data.test[0][0].shape == (1, 8, 8)
    assert len(data.test) == 6


def test_imagefolder_augments_only_the_training_images_when_asked(make_cfg, tmp_path):
    root = _own_images(tmp_path / "own")
    options = ("data=imagefolder", f"data.root={root}", "data.image_size=16")
    plain = build_data(make_cfg(*options).data)
    augmented = build_data(make_cfg(*options, "data.augment=true").data)
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    torch.manual_seed(0)
    assert not all(torch.equal(augmented.train[0][0], augmented.train[0][0]) for _ in range(5))
    assert torch.equal(augmented.test[0][0], plain.test[0][0])


def test_imagefolder_missing_or_wrong_input_says_what_is_wrong(make_cfg, tmp_path):
    def fails(*options: str, match: str) -> None:
        with pytest.raises(UserError, match=match):
            build_data(make_cfg("data=imagefolder", *options).data)

    fails(match="set data.root to the folder holding train/<class>/<image> and val/")
    fails(f"data.root={tmp_path / 'nowhere'}", match=r"data.root folder not found at .*nowhere")
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    fails(f"data.root={tmp_path / 'only_train'}",
          match=r"'val/<class>/<image>' not found at .*only_train/val")
    root = _own_images(tmp_path / "own")
    fails(f"data.root={root}", "data.num_classes=10", match="3 classes.*data.num_classes=10")
    fails(f"data.root={root}", "data.channels=2", match="data.channels takes 1, 3 or null")


@pytest.mark.parametrize(("mode", "augment"), [("RGB", True), ("L", False)])
def test_train_runs_end_to_end_on_your_own_images(make_cfg, tmp_path, mode, augment):
    from compaware.train import train

    root = _own_images(tmp_path / "own", mode)
    results = train(make_cfg("data=imagefolder", f"data.root={root}", "data.image_size=32",
                             f"data.augment={augment}", "data.num_workers=0",
                             "schedule.batch_size=4", "compress.rank=2", "compress.target=null",
                             "bench.latency=false"))
    # The facts read from the images, recorded (the chance level of the summary uses them).
    data = results["config"]["data"]
    assert (data["channels"], data["num_classes"]) == (1 if mode == "L" else 3, 3)
    assert results["accuracy"]["finetuned"] is not None
