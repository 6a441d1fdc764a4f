"""Datasets for the classification pipeline. MNIST-style data (Fashion-MNIST, MNIST) comes from a
torchvision-layout root, from Debian's dataset packages (extracted once into a cache folder and
read by torchvision's own loader), or, with a network, from torchvision's download."""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import torch
import torchvision

from sgdet.errors import DatasetError
from sgdet.files import copy_stream

# Debian's dataset-fashion-mnist package installs the idx.gz files here
DEBIAN_LOCATIONS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist",
                    "mnist": "/usr/share/datasets/mnist"}
_TORCHVISION = {"fashion-mnist": torchvision.datasets.FashionMNIST, "mnist": torchvision.datasets.MNIST}
_STATS = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
HOW_TO_GET = ("install Debian's package (apt-get install dataset-fashion-mnist), pass --data <root> "
              "holding <root>/FashionMNIST/raw/ as torchvision lays it out, or run once with a network "
              "and --download")


def cache_dir() -> str:
    return os.environ.get("SGDET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sgdet"))


def _extract_debian(name: str, source: str) -> str:
    """Decompress the Debian idx.gz files into <cache>/<Class>/raw/ once; return the cache root."""
    root = os.path.join(cache_dir(), name)
    raw = os.path.join(root, _TORCHVISION[name].__name__, "raw")
    os.makedirs(raw, exist_ok=True)
    for stem in _FILES:
        target = os.path.join(raw, stem)
        if os.path.exists(target):
            continue
        gz = os.path.join(source, stem + ".gz")
        plain = os.path.join(source, stem)
        if not (os.path.isfile(gz) or os.path.isfile(plain)):
            raise DatasetError(f"{source} lacks {stem}(.gz); reinstall the dataset package")
        with (gzip.open(gz, "rb") if os.path.isfile(gz) else open(plain, "rb")) as src:
            copy_stream(src, target)
    return root


def find_mnist_root(name: str, data: str | None = None, download: bool = False) -> str:
    """The torchvision root to read ``name`` from, or a DatasetError saying how to get it."""
    cls = _TORCHVISION[name]
    if data is not None:
        if not os.path.isdir(data):
            raise DatasetError(f"dataset folder not found: {data}")
        if os.path.isdir(os.path.join(data, cls.__name__, "raw")) or download:
            return data
        if any(os.path.isfile(os.path.join(data, f + ".gz")) for f in _FILES):
            return _extract_debian(name, data)          # a folder of idx.gz files
        raise DatasetError(f"{data} has no {cls.__name__}/raw/ folder nor idx.gz files; {HOW_TO_GET}")
    debian = DEBIAN_LOCATIONS[name]
    if os.path.isdir(debian):
        return _extract_debian(name, debian)
    cached = os.path.join(cache_dir(), name)
    if os.path.isdir(os.path.join(cached, cls.__name__, "raw")) or download:
        return cached
    raise DatasetError(f"{name} not found at {debian}; {HOW_TO_GET}")


@dataclass
class TensorSplit:
    images: torch.Tensor   # [N, 1, 28, 28] float, normalised
    labels: torch.Tensor   # [N] long


def load_mnist_style(name: str = "fashion-mnist", data: str | None = None, download: bool = False
                     ) -> tuple[TensorSplit, TensorSplit]:
    """Train and test splits as normalised tensors, read by torchvision's MNIST loader."""
    if name not in _TORCHVISION:
        raise DatasetError(f"unknown dataset {name!r}; choose from: {', '.join(_TORCHVISION)}")
    root = find_mnist_root(name, data, download)
    mean, std = _STATS[name]
    splits = []
    for train in (True, False):
        try:
            ds = _TORCHVISION[name](root, train=train, download=download)
        except RuntimeError as exc:
            raise DatasetError(f"cannot read {name} from {root}: {exc}; {HOW_TO_GET}") from None
        images = (ds.data.unsqueeze(1).float() / 255.0 - mean) / std
        splits.append(TensorSplit(images, ds.targets.long()))
    return splits[0], splits[1]
