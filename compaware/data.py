"""Datasets and loaders. Small datasets live in memory as tensors; large ones stream.

``data.name`` picks a loader from :data:`LOADERS`. Each returns the train and test
sets and the facts the model needs (:class:`DataInfo`). A dataset that is not on disk
stops with a message saying where we looked and how to get it.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from compaware import distributed, resources
from compaware.config import DataConfig, UserError, check_choice

# Debian's dataset-fashion-mnist package installs the IDX files here.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DataInfo:
    name: str
    channels: int
    image_size: int
    num_classes: int
    train_size: int


@dataclass
class Data:
    train: Dataset
    test: Dataset
    info: DataInfo


def build_data(cfg: DataConfig) -> Data:
    """The train and test sets ``cfg`` asks for (``data.limit``: the first N training samples)."""
    check_choice("data.name", cfg.name, sorted(LOADERS))
    if cfg.name == "synthetic" and None in (cfg.channels, cfg.num_classes):
        raise UserError("data=synthetic makes images of the configured shape: set "
                        "data.channels and data.num_classes (null is for real data only).")
    check_fits_in_memory(cfg)
    train, test, channels, num_classes = LOADERS[cfg.name](cfg)
    configured = (cfg.channels, cfg.num_classes)
    if cfg.name != "synthetic" and any(said not in (None, fact) for said, fact
                                       in zip(configured, (channels, num_classes), strict=True)):
        raise UserError(
            f"data={cfg.name} has {channels} channel(s) and {num_classes} classes, but the config "
            f"says data.channels={cfg.channels}, data.num_classes={cfg.num_classes}. These are "
            f"facts of the dataset; set them only for data=synthetic (or null: the dataset's).")
    if cfg.limit is not None:
        train = Subset(train, range(min(cfg.limit, len(train))))
    info = DataInfo(cfg.name, channels, cfg.image_size, num_classes, len(train))
    return Data(train, test, info)


def train_loader(data: Data, batch_size: int, seed: int, epoch: int, num_workers: int = 0,
                 skip: int = 0) -> DataLoader:
    """This rank's training batches of one epoch, shuffled by a generator seeded from
    (seed, epoch), without the first ``skip`` batches (already seen before a preemption).

    The order depends only on the epoch, never on what ran before, so a resumed run
    sees exactly the batches an uninterrupted one would. ``batch_size`` is the global
    batch: with N processes each rank takes every N-th sample of the same permutation, so
    the ranks' batches together are the batch one process would take.
    """
    sampler = DistributedSampler(data.train, num_replicas=distributed.world_size(),
                                 rank=distributed.rank(), seed=seed * 100_003)
    sampler.set_epoch(epoch)  # the permutation of seed·100003 + epoch
    rank_batch = batch_size // distributed.world_size()  # divisible: distributed.setup
    indices = list(sampler)[skip * rank_batch:]
    # Its own generator (worker seeds) leaves the global RNG to the model: resuming mid-epoch
    # restores that RNG, and creating the loader must not move it.
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(data.train, batch_size=rank_batch, num_workers=num_workers,
                      sampler=indices, generator=generator)


def test_loader(data: Data, batch_size: int, num_workers: int = 0) -> DataLoader:
    """This rank's share of the test set (all of it in one process), in order."""
    shard = Subset(data.test, range(distributed.rank(), len(data.test), distributed.world_size()))
    return DataLoader(shard, batch_size=batch_size, num_workers=num_workers)


Split = tuple[Dataset, Dataset, int, int]  # train, test, channels, classes


def _standardized(train_x: torch.Tensor, test_x: torch.Tensor, train_y, test_y,
                  num_classes: int) -> Split:
    """In-memory tensor datasets, standardised with the training set's mean and std."""
    mean, std = train_x.mean(), train_x.std()
    train = TensorDataset((train_x - mean) / std, torch.as_tensor(train_y, dtype=torch.long))
    test = TensorDataset((test_x - mean) / std, torch.as_tensor(test_y, dtype=torch.long))
    return train, test, train_x.shape[1], num_classes


# The datasets held in memory as tensors, by their number of images (synthetic: configured).
IN_MEMORY = {"digits": 1797, "mnist": 70_000, "fashion_mnist": 70_000}


def check_fits_in_memory(cfg: DataConfig) -> None:
    """Stop before loading a dataset held in memory whose images, resized to
    ``data.image_size`` (float32, with the copy resizing makes), cannot fit."""
    images = (cfg.train_size + cfg.test_size if cfg.name == "synthetic"
              else IN_MEMORY.get(cfg.name, 0))
    per_image = 4 * (cfg.channels or 1) * cfg.image_size ** 2  # None: gray, as all these are
    resources.require(2 * images * per_image, f"data={cfg.name} at data.image_size="
                      f"{cfg.image_size} ({images:,} images held in memory)",
                      "data.image_size" + (" or data.train_size/test_size"
                                           if cfg.name == "synthetic" else ""),
                      torch.device("cpu"))


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def load_digits(cfg: DataConfig) -> Split:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download), upscaled.

    A fixed seeded split keeps 360 images for testing.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test_idx, train_idx = order[:360], order[360:]
    images = _resized(images, cfg.image_size)
    return _standardized(images[train_idx], images[test_idx], labels[train_idx],
                         labels[test_idx], 10)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folders: list[Path]) -> list[Path] | None:
    for folder in folders:
        found = []
        for stem in IDX_FILES:
            candidates = [folder / f"{stem}.gz", folder / stem]
            found.append(next((p for p in candidates if p.is_file()), None))
        if all(found):
            return found
    return None


def _idx_dataset(cfg: DataConfig, torchvision_name: str, default_roots: list[str],
                 how_to_get: str) -> Split:
    """MNIST-format data from the first folder that holds all four IDX files.

    torchvision's MNIST classes expect their own folder layout with unpacked files; the
    format is simple enough to read directly, which lets us use Debian's ``.gz`` files
    where they are.
    """
    roots = [cfg.root] if cfg.root else default_roots
    if cfg.download:
        getattr(torchvision.datasets, torchvision_name)(roots[0], download=True)
    folders = [Path(r) / sub for r in roots for sub in ("", f"{torchvision_name}/raw")]
    files = _find_idx(folders)
    if files is None:
        looked = ", ".join(str(f) for f in folders)
        raise UserError(
            f"data={cfg.name}: the IDX files ({', '.join(s + '.gz' for s in IDX_FILES)}) "
            f"were not found; looked in {looked}. {how_to_get} Or point data.root at a "
            f"folder holding them, or set data.download=true where a network exists.")
    train_x, train_y, test_x, test_y = (_read_idx(p) for p in files)

    def as_images(pixels: np.ndarray) -> torch.Tensor:
        images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 255.0
        return _resized(images, cfg.image_size)

    return _standardized(as_images(train_x), as_images(test_x), train_y, test_y, 10)


def load_fashion_mnist(cfg: DataConfig) -> Split:
    return _idx_dataset(cfg, "FashionMNIST", [DEBIAN_FASHION_MNIST, "data/fashion_mnist"],
                        "On Debian: apt-get install dataset-fashion-mnist.")


def load_mnist(cfg: DataConfig) -> Split:
    return _idx_dataset(cfg, "MNIST", ["data/mnist"],
                        "Get them from https://yann.lecun.com/exdb/mnist/.")


def _require_dir(cfg: DataConfig, path: Path, what: str, hint: str = "") -> None:
    if not path.is_dir():
        raise UserError(f"data={cfg.name}: {what} not found at {path}. Set data.root to the "
                        f"folder that holds it{hint}.")


def load_cifar10(cfg: DataConfig) -> Split:
    """CIFAR-10's standard python batches (``cifar-10-batches-py``) through torchvision,
    with the usual random crop and flip for training."""
    root = Path(cfg.root or "data/cifar10")
    if not cfg.download:
        _require_dir(cfg, root / "cifar-10-batches-py", "cifar-10-batches-py",
                     ", or set data.download=true where a network exists")
    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    resize = [transforms.Resize(cfg.image_size)] if cfg.image_size != 32 else []
    train_tf = transforms.Compose(resize + [transforms.RandomCrop(cfg.image_size, padding=4),
                                            transforms.RandomHorizontalFlip(),
                                            transforms.ToTensor(), normalize])
    test_tf = transforms.Compose(resize + [transforms.ToTensor(), normalize])
    cifar = torchvision.datasets.CIFAR10
    return (cifar(str(root), train=True, transform=train_tf, download=cfg.download),
            cifar(str(root), train=False, transform=test_tf, download=cfg.download), 3, 10)


def load_imagenet(cfg: DataConfig) -> Split:
    """An ImageFolder tree ``<root>/train/<class>/…`` and ``<root>/val/<class>/…`` with the
    standard ImageNet transforms (random resized crop + flip; resize + center crop)."""
    normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    size = cfg.image_size
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   normalize])
    test_tf = transforms.Compose([transforms.Resize(size * 256 // 224),
                                  transforms.CenterCrop(size), transforms.ToTensor(), normalize])
    train, test = _image_folders(cfg, Path(cfg.root or "data/imagenet"), ("train", "val"),
                                 train_tf, test_tf)
    return train, test, 3, len(train.classes)


def load_icdar(cfg: DataConfig) -> Split:
    """ICDAR character crops as an ImageFolder tree ``<root>/train/<class>/…`` and
    ``<root>/test/<class>/…`` (36 classes, 0-9 and a-z, in the papers): read as gray,
    resized to ``image_size`` (32), scaled to [-1, 1]; no augmentation."""
    tf = transforms.Compose([transforms.Grayscale(1), transforms.Resize((cfg.image_size,) * 2),
                             transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train, test = _image_folders(cfg, Path(cfg.root or "data/icdar"), ("train", "test"), tf, tf)
    return train, test, 1, len(train.classes)


# PIL modes of one channel: bilevel, 8-bit, with alpha, 32-bit integer, 16-bit, float.
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def load_imagefolder(cfg: DataConfig) -> Split:
    """Your own images as ImageFolder trees ``<root>/train/<class>/<image>`` and
    ``<root>/val/<class>/<image>`` (or ``test/``). The classes are the folders and the
    channels the images' (:func:`imagefolder_facts`), or ``data.channels`` when set (1: gray,
    3: colour). Each image is resized to a square of ``data.image_size`` and scaled to
    [-1, 1]; ``data.augment`` adds a random crop (padding of an eighth of the size) and a
    horizontal flip to the training images."""
    if not cfg.root:
        raise UserError("data=imagefolder reads your own images: set data.root to the folder "
                        "holding train/<class>/<image> and val/<class>/<image> (or test/).")
    root = Path(cfg.root)
    _require_dir(cfg, root, "the data.root folder")
    test_split = "test" if (root / "test").is_dir() and not (root / "val").is_dir() else "val"
    if cfg.channels not in (None, 1, 3):
        raise UserError(f"data=imagefolder reads images as gray or colour: data.channels takes "
                        f"1, 3 or null (from the images), not {cfg.channels}.")
    train, test = _image_folders(cfg, root, ("train", test_split), None, None)
    channels = cfg.channels or imagefolder_facts(str(root))[0]
    size = cfg.image_size
    # The default loader gives RGB images; gray ones are turned back into one channel.
    common = [transforms.Grayscale(1)] if channels == 1 else []
    common.append(transforms.Resize((size, size)))
    tail = [transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.5,) * channels)]
    augment = ([transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip()]
               if cfg.augment else [])
    train.transform = transforms.Compose(common + augment + tail)
    test.transform = transforms.Compose(common + tail)
    return train, test, channels, len(train.classes)


@functools.lru_cache(maxsize=8)
def imagefolder_facts(root: str | None) -> tuple[int | None, int | None]:
    """The channels and the classes of the tree ``<root>/train/<class>/<image>``: 1 channel
    when one image of each class is gray (its PIL mode: headers only, and a colour class
    in a mostly gray tree still counts), else 3; (None, None) without a tree, for
    :func:`load_imagefolder` to say what is missing.

    ``compaware/conf/data/imagefolder.yaml`` reads these when the config is resolved, so everything
    built from the config (the compressors' ``input_shape``, the run's record and its
    chance level) has the data's facts without the user writing them down.
    """
    train = Path(root or "") / "train"
    if not root or not train.is_dir():
        return None, None
    classes = sorted(d for d in train.iterdir() if d.is_dir())
    # The first image the file system lists: no listing of whole (large) class folders.
    images = (next((p for p in c.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS), None)
              for c in classes)
    gray = all(_mode(image) in GRAY_MODES for image in images if image is not None)
    return 1 if gray else 3, len(classes)


def _mode(image: Path) -> str:
    with Image.open(image) as opened:  # reads the header only
        return opened.mode


# The resolvers compaware/conf/data/imagefolder.yaml names: `${imagefolder_channels:${data.root}}`.
for _name, _index in (("imagefolder_channels", 0), ("imagefolder_classes", 1)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, lambda root, i=_index: imagefolder_facts(root)[i])


def _image_folders(cfg: DataConfig, root: Path, splits: tuple[str, str], train_tf, test_tf
                   ) -> tuple[torchvision.datasets.ImageFolder, torchvision.datasets.ImageFolder]:
    """Train and test ImageFolder trees ``<root>/<split>/<class>/<image>`` with the same
    classes."""
    for split in splits:
        _require_dir(cfg, root / split, f"the ImageFolder tree '{split}/<class>/<image>'",
                     f" (compaware/conf/data/{cfg.name}.yaml describes it)")
    try:
        train, test = (torchvision.datasets.ImageFolder(str(root / split), transform=tf)
                       for split, tf in zip(splits, (train_tf, test_tf), strict=True))
    except FileNotFoundError as e:  # a class folder without images
        raise UserError(f"data={cfg.name}: {e} (in {root}).") from None
    if train.classes != test.classes:
        raise UserError(f"data={cfg.name}: {root / splits[0]} and {root / splits[1]} have "
                        f"different class folders ({len(train.classes)} and "
                        f"{len(test.classes)}); both need one folder per class, the same ones.")
    return train, test


def load_synthetic(cfg: DataConfig) -> Split:
    """Random images of the configured shape: a fixed prototype per class plus Gaussian
    noise (``data.noise``), so the task is learnable but not trivial. Seeded, no files."""
    g = torch.Generator().manual_seed(1234)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    prototypes = torch.randn(cfg.num_classes, *shape, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(cfg.num_classes, (n,), generator=g)
        return prototypes[labels] + cfg.noise * torch.randn(n, *shape, generator=g), labels

    (train_x, train_y), (test_x, test_y) = sample(cfg.train_size), sample(cfg.test_size)
    return _standardized(train_x, test_x, train_y, test_y, cfg.num_classes)


LOADERS: dict[str, Callable[[DataConfig], Split]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagenet": load_imagenet,
    "icdar": load_icdar,
    "imagefolder": load_imagefolder,
    "synthetic": load_synthetic,
}
