"""Stage 1 of the classification pipeline: the datasets (ImageNet-style ImageFolder, CIFAR-10/100,
MNIST/Fashion-MNIST) as ``(train, val)`` torch Datasets with the paper's augmentation, read from
local folders only (nothing is downloaded).

Contract with the engine
------------------------
``build_datasets(cfg) -> (train, val)``; every sample is ``(image_tensor, label)`` where the label
is an int (ImageFolder, CIFAR) or a 0-dim long tensor (MNIST) -- default collation makes both a
``[B]`` long tensor. ``num_classes_of(cfg) -> int``.

ImageFolder data may hold unreadable images (truncated JPEG, zero-byte file, text named .jpg).
Those samples are *skipped*, never a crash: ``SkippingImageFolder.__getitem__`` catches the
decoding error, logs a warning naming the file (logger ``classification.datasets``) and returns
the sentinel ``None``. Build every loader with::

    DataLoader(ds, ..., collate_fn=datasets.collate_skipping_bad)

``collate_skipping_bad(batch)`` drops the ``None`` samples and ALWAYS returns a 3-tuple
``(images, labels, n_skipped)``: ``images`` a float tensor ``[B', C, H, W]``, ``labels`` a long
tensor ``[B']`` and ``n_skipped`` a python int, the number of samples of this batch that were
dropped. ``B'`` may be 0 when every sample of the batch was bad: then ``images`` is an empty
float tensor of shape ``[0]`` and ``labels`` an empty long tensor, and the engine must skip the
step. Summing ``n_skipped`` over the batches of an epoch gives the epoch's skip count, correct
with any number of DataLoader workers (the count travels with the batch from the worker).
``SkippingImageFolder.skipped`` / ``skipped_count(ds)`` is a per-process counter too, but with
``workers > 0`` it counts in the worker processes and the main process sees 0 -- use the
per-batch count. The collate works for CIFAR/MNIST datasets as well (n_skipped is then 0), so
the engine can use it for every dataset.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms as T

from sgdet.engine.data import collate_skipping_bad  # noqa: F401  (the loaders' collate)
from sgdet.errors import ConfigError, DatasetError

from .mnist import load_mnist_style

log = logging.getLogger("classification.datasets")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}

NAMES = ("imagenet", "imagefolder", "cifar10", "cifar100", "mnist", "fashion-mnist")
_FIXED_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion-mnist": 10}

IMAGEFOLDER_LAYOUT = ("expected layout: <ROOT>/train/<class>/<image> and <ROOT>/val/<class>/<image> "
                      "(the same class folder names in both; ImageNet's flat val/ must be sorted "
                      "into class folders first)")


# ---------------------------------------------------------------------------------------- helpers

def _name(cfg) -> str:
    name = str(cfg.DATA.NAME).lower()
    if name not in NAMES:
        raise ConfigError(f"unknown DATA.NAME {cfg.DATA.NAME!r}; choose from: {', '.join(NAMES)}")
    return "imagenet" if name == "imagefolder" else name


def dataset_label(cfg) -> str:
    """The data set's name for titles: the named set, or an ImageFolder's folder name
    (``imagenet`` and ``imagefolder`` read any ImageFolder, so the name alone says little)."""
    name = str(cfg.DATA.NAME).lower()
    if name in ("imagenet", "imagefolder") and cfg.DATA.ROOT:
        return os.path.basename(os.path.normpath(str(cfg.DATA.ROOT))) or name
    return name


def _root(cfg, name: str) -> str:
    root = str(cfg.DATA.ROOT or "")
    if not root:
        raise DatasetError(f"DATA.ROOT is not set; {name} is read from a local folder "
                           f"({_layout_hint(name)})")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder not found: {root} ({_layout_hint(name)})")
    return root


def _layout_hint(name: str) -> str:
    if name == "imagenet":
        return IMAGEFOLDER_LAYOUT
    if name in _CIFAR:
        return (f"expected torchvision's layout: <ROOT>/{_CIFAR[name].base_folder}/ holding "
                f"{', '.join(f for f, _ in _CIFAR[name].train_list + _CIFAR[name].test_list)} "
                f"and {_CIFAR[name].meta['filename']} (the extracted python-version tarball)")
    return "a torchvision MNIST-layout root or a folder of idx.gz files"


def _input_size(cfg, default: int) -> int:
    size = list(cfg.MODEL.INPUT_SIZE or [])
    if not size:
        return default
    if len(size) != 3 or size[1] != size[2] or int(size[-1]) < 1:
        raise ConfigError(f"MODEL.INPUT_SIZE must be [C, S, S] with square S >= 1, got {size}")
    return int(size[-1])


def skipped_count(dataset: Dataset) -> int:
    """Unreadable samples this process's copy of ``dataset`` (or the dataset a Subset wraps) has
    skipped so far. Only meaningful with DataLoader workers=0; otherwise sum the per-batch
    ``n_skipped`` that ``collate_skipping_bad`` returns."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return int(getattr(dataset, "skipped", 0))


# ------------------------------------------------------------------------------------ ImageFolder

class SkippingImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder whose unreadable images give ``None`` (logged, counted in
    ``skipped``/``bad_files``) instead of an exception. ``classes`` pins the class list (so val
    labels use train's indices)."""

    may_skip = True      # the Trainer keeps ranks in step when a batch loses samples

    def __init__(self, root: str, transform: Callable | None = None,
                 classes: Sequence[str] | None = None) -> None:
        self._pinned = list(classes) if classes is not None else None
        super().__init__(root, transform=transform)
        self.skipped = 0
        self.bad_files: set[str] = set()

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._pinned is None:
            return super().find_classes(directory)
        return self._pinned, {c: i for i, c in enumerate(self._pinned)}

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.loader(path)       # PIL open + convert('RGB'): decodes the whole file
        except Exception as exc:            # OSError, UnidentifiedImageError, SyntaxError, ...
            self.skipped += 1
            self.bad_files.add(path)
            log.warning("skipping unreadable image %s (%s: %s)", path, exc.__class__.__name__,
                        str(exc).splitlines()[0] if str(exc) else "unreadable")
            return None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def imagefolder_transforms(size: int = 224) -> tuple[Callable, Callable]:
    """The paper's ImageNet augmentation scaled to ``size``: train rescales the short side to
    round(size*256/224) and takes a random ``size`` crop plus a horizontal flip; val rescales the
    same way and takes the centre crop."""
    resize = round(size * 256 / 224)
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.Resize(resize), T.RandomCrop(size), T.RandomHorizontalFlip(),
                       T.ToTensor(), norm])
    val = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), norm])
    return train, val


def _imagefolder_classes(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder} is missing; {IMAGEFOLDER_LAYOUT}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"{folder} has no class folders; {IMAGEFOLDER_LAYOUT}")
    return classes


def _open_imagefolder(folder: str, transform: Callable, classes: list[str]) -> SkippingImageFolder:
    try:
        ds = SkippingImageFolder(folder, transform=transform, classes=classes)
    except FileNotFoundError as exc:        # a class folder without any image file
        raise DatasetError(f"{folder}: {str(exc).splitlines()[0]}; {IMAGEFOLDER_LAYOUT}") from None
    log.info("%s: %d images in %d classes", folder, len(ds), len(classes))
    return ds


def build_imagefolder(root: str, size: int = 224) -> tuple[Dataset, Dataset]:
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    classes = _imagefolder_classes(train_dir)
    val_classes = _imagefolder_classes(val_dir)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(classes))[:3]
        raise DatasetError(f"{train_dir} and {val_dir} hold different class folders (only in train: "
                           f"{', '.join(only_train) or '-'}; only in val: {', '.join(only_val) or '-'}); "
                           f"{IMAGEFOLDER_LAYOUT}")
    train_tf, val_tf = imagefolder_transforms(size)
    return (_open_imagefolder(train_dir, train_tf, classes),
            _open_imagefolder(val_dir, val_tf, classes))


# ------------------------------------------------------------------------------------------ CIFAR

def _no_md5(cls: type) -> type:
    """A subclass of torchvision's CIFAR loader that checks its files exist but not their md5
    (torchvision's md5 list only admits the official archive; any file in the same pickle format
    is read, and a malformed one becomes a DatasetError in ``build_cifar``)."""
    return type(f"Local{cls.__name__}", (cls,), {
        "train_list": [[f, None] for f, _ in cls.train_list],
        "test_list": [[f, None] for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
        "__module__": __name__,
    })


LocalCIFAR10 = _no_md5(torchvision.datasets.CIFAR10)
LocalCIFAR100 = _no_md5(torchvision.datasets.CIFAR100)
_CIFAR = {"cifar10": LocalCIFAR10, "cifar100": LocalCIFAR100}


def cifar_transforms(name: str) -> tuple[Callable, Callable]:
    """Train: 4-pixel padded random 32 crop + horizontal flip; both normalised by CIFAR stats."""
    mean, std = CIFAR_STATS[name]
    norm = T.Normalize(mean, std)
    train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val = T.Compose([T.ToTensor(), norm])
    return train, val


def build_cifar(name: str, root: str) -> tuple[Dataset, Dataset]:
    cls = _CIFAR[name]
    folder = os.path.join(root, cls.base_folder)
    missing = [f for f, _ in cls.train_list + cls.test_list + [[cls.meta["filename"], None]]
               if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DatasetError(f"{folder} lacks {', '.join(missing)}; {_layout_hint(name)}")
    train_tf, val_tf = cifar_transforms(name)
    splits = []
    for train, tf in ((True, train_tf), (False, val_tf)):
        try:
            ds = cls(root, train=train, transform=tf, download=False)
        except Exception as exc:             # unpickling errors, EOF, missing keys, bad shapes
            raise DatasetError(f"cannot read {name} from {folder}: {exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'corrupt file'}; "
                               f"{_layout_hint(name)}") from None
        n_classes = _FIXED_CLASSES[name]
        if len(ds.targets) != len(ds.data) or (ds.targets and not 0 <= min(ds.targets) <= max(ds.targets) < n_classes):
            raise DatasetError(f"{folder}: labels do not match the images or lie outside 0..{n_classes - 1}")
        splits.append(ds)
    return splits[0], splits[1]


# ---------------------------------------------------------------------------------------- MNIST

class ResizedImages(Dataset):
    """MNIST-style images resized on the fly to ``[channels, size, size]`` (bilinear; the grey
    plane repeated ``channels`` times), for networks built for larger RGB inputs (a torchvision
    ResNet on Fashion-MNIST). Resizing per sample keeps memory at the 28 px tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int, size: int) -> None:
        self.images, self.labels, self.channels, self.size = images, labels, channels, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if image.shape[-1] != self.size:
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear",
                                  align_corners=False)[0]
        return image.expand(self.channels, -1, -1).contiguous(), self.labels[index]


def build_mnist(name: str, root: str | None, channels: int = 1, size: int = 28) -> tuple[Dataset, Dataset]:
    """Normalised ``[1, 28, 28]`` tensors and long labels, read by classification.mnist; with
    MODEL.INPUT_SIZE ``[C, S, S]`` other than ``[1, 28, 28]``, resized to it (ResizedImages)."""
    if channels not in (1, 3):
        raise ConfigError(f"MODEL.INPUT_SIZE[0] must be 1 or 3 for {name} (grey images), got {channels}")
    train, test = load_mnist_style(name, data=root, download=False)
    if (channels, size) == (1, 28):
        return TensorDataset(train.images, train.labels), TensorDataset(test.images, test.labels)
    return (ResizedImages(train.images, train.labels, channels, size),
            ResizedImages(test.images, test.labels, channels, size))


# ------------------------------------------------------------------------------------------- API

def build_datasets(cfg) -> tuple[Dataset, Dataset]:
    """(train, val) Datasets for ``cfg.DATA.NAME`` from ``cfg.DATA.ROOT``; ``cfg.DATA.LIMIT_TRAIN``
    > 0 keeps the first N training samples. Errors are DatasetError/ConfigError naming the path."""
    name = _name(cfg)
    if name == "imagenet":
        train, val = build_imagefolder(_root(cfg, name), _input_size(cfg, 224))
    elif name in _CIFAR:
        train, val = build_cifar(name, _root(cfg, name))
    else:
        root = str(cfg.DATA.ROOT or "") or None
        channels = int((cfg.MODEL.INPUT_SIZE or [1])[0])
        train, val = build_mnist(name, os.path.expanduser(root) if root else None, channels,
                                 _input_size(cfg, 28))
    limit = int(cfg.DATA.LIMIT_TRAIN or 0)
    if limit < 0:
        raise ConfigError(f"DATA.LIMIT_TRAIN must be >= 0, got {limit}")
    if limit > 0:
        train = Subset(train, range(min(limit, len(train))))
    return train, val


def num_classes_of(cfg) -> int:
    """Number of classes of ``cfg.DATA.NAME``: fixed for CIFAR/MNIST, the class folders of
    ``<ROOT>/train`` for ImageFolder data."""
    name = _name(cfg)
    if name in _FIXED_CLASSES:
        return _FIXED_CLASSES[name]
    return len(_imagefolder_classes(os.path.join(_root(cfg, name), "train")))
