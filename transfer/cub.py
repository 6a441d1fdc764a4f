"""Stage 1 of the transfer pipeline: the CUB-200-2011 dataset, read from the official
``CUB_200_2011/`` layout as ``(train, test)`` torch Datasets (5,994 / 5,794 images in the real set).

Layout (every file ``<id> <value...>`` per line, ids 1-based)::

    images.txt               <image id> <path under images/>
    image_class_labels.txt   <image id> <class id>
    train_test_split.txt     <image id> <1: train, 0: test>
    classes.txt              <class id> <class name>
    bounding_boxes.txt       <image id> <x> <y> <width> <height>     (only with DATA.CROP_BOXES)
    images/<class folder>/<file>.jpg

Parsing is strict: a malformed line, a duplicate id, an id missing from or unknown to a file,
a class id not in classes.txt or an image file that does not exist is one ``DatasetError``
naming the file and line. An image that exists but cannot be decoded is skipped at load time the
way the classification pipeline does it: the sample is ``None`` and
``sgdet.engine.data.collate_skipping_bad`` drops it, so the Trainer's loaders work as is.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from classification.datasets import IMAGENET_MEAN, IMAGENET_STD
from sgdet.errors import ConfigError, DatasetError

log = logging.getLogger("transfer.cub")

FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
LAYOUT = ("expected the official CUB_200_2011/ layout: images.txt, image_class_labels.txt, "
          "train_test_split.txt, classes.txt and images/")


def _read_table(path: str, fields: int, last_free: bool = False) -> dict[int, tuple[list[str], int]]:
    """{id: (the other fields, line number)} of a whitespace-separated id file. ``last_free``:
    the last field is the rest of the line (paths and names). Blank lines are ignored."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found; {LAYOUT}")
    rows: dict[int, tuple[list[str], int]] = {}
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc.__class__.__name__}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=fields - 1) if last_free else line.split()
        if len(parts) != fields:
            raise DatasetError(f"{path} line {number}: expected {fields} fields, got {len(parts)}: "
                               f"{line.strip()[:80]!r}")
        try:
            key = int(parts[0])
        except ValueError:
            raise DatasetError(f"{path} line {number}: id {parts[0]!r} is not an integer") from None
        if key in rows:
            raise DatasetError(f"{path} line {number}: duplicate id {key} (first on line "
                               f"{rows[key][1]} of {name})")
        rows[key] = ([p.strip() for p in parts[1:]], number)
    if not rows:
        raise DatasetError(f"{path} is empty; {LAYOUT}")
    return rows


def _same_ids(reference: dict, ref_path: str, other: dict, other_path: str) -> None:
    """Every image id of images.txt appears in ``other`` and nothing else does."""
    for key, (_, number) in other.items():
        if key not in reference:
            raise DatasetError(f"{other_path} line {number}: image id {key} is not in {os.path.basename(ref_path)}")
    for key, (_, number) in reference.items():
        if key not in other:
            raise DatasetError(f"{other_path} lacks image id {key} ({os.path.basename(ref_path)} line {number})")


def _int_field(value: str, path: str, number: int, what: str, allowed=None) -> int:
    try:
        result = int(value)
    except ValueError:
        raise DatasetError(f"{path} line {number}: {what} {value!r} is not an integer") from None
    if allowed is not None and result not in allowed:
        raise DatasetError(f"{path} line {number}: {what} must be one of {sorted(allowed)}, got {result}")
    return result


class CUBIndex:
    """The parsed, checked metadata of one ``CUB_200_2011/`` folder."""

    def __init__(self, root: str, crop_boxes: bool = False) -> None:
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            raise DatasetError(f"dataset folder not found: {root}; {LAYOUT}")
        self.root = root
        path = {name: os.path.join(root, name) for name in FILES + ("bounding_boxes.txt",)}
        images = _read_table(path["images.txt"], 2, last_free=True)
        labels = _read_table(path["image_class_labels.txt"], 2)
        split = _read_table(path["train_test_split.txt"], 2)
        classes = _read_table(path["classes.txt"], 2, last_free=True)
        _same_ids(images, path["images.txt"], labels, path["image_class_labels.txt"])
        _same_ids(images, path["images.txt"], split, path["train_test_split.txt"])
        class_ids = sorted(classes)
        self.classes = [classes[c][0][0] for c in class_ids]
        index_of = {c: i for i, c in enumerate(class_ids)}      # class id -> label 0..K-1
        boxes = None
        if crop_boxes:
            boxes = _read_table(path["bounding_boxes.txt"], 5)
            _same_ids(images, path["images.txt"], boxes, path["bounding_boxes.txt"])
        image_dir = os.path.join(root, "images")
        if not os.path.isdir(image_dir):
            raise DatasetError(f"{image_dir} not found; {LAYOUT}")
        self.samples: dict[str, list[tuple[str, int, tuple | None]]] = {"train": [], "test": []}
        for key in sorted(images):
            (rel,), number = images[key]
            file = os.path.join(image_dir, rel)
            if not os.path.isfile(file):
                raise DatasetError(f"{path['images.txt']} line {number}: image file {file} does not exist")
            (cls,), cls_line = labels[key]
            cls = _int_field(cls, path["image_class_labels.txt"], cls_line, "class id")
            if cls not in index_of:
                raise DatasetError(f"{path['image_class_labels.txt']} line {cls_line}: class id {cls} "
                                   f"is not in classes.txt")
            (is_train,), split_line = split[key]
            is_train = _int_field(is_train, path["train_test_split.txt"], split_line, "split flag", {0, 1})
            box = None
            if boxes is not None:
                values, box_line = boxes[key]
                try:
                    x, y, w, h = (float(v) for v in values)
                except ValueError:
                    raise DatasetError(f"{path['bounding_boxes.txt']} line {box_line}: box values must be "
                                       f"numbers, got {' '.join(values)!r}") from None
                if w <= 0 or h <= 0 or x < 0 or y < 0:
                    raise DatasetError(f"{path['bounding_boxes.txt']} line {box_line}: box "
                                       f"{x:g} {y:g} {w:g} {h:g} must have x, y >= 0 and width, height > 0")
                box = (x, y, x + w, y + h)
            self.samples["train" if is_train else "test"].append((file, index_of[cls], box))
        for name in ("train", "test"):
            if not self.samples[name]:
                raise DatasetError(f"{path['train_test_split.txt']} puts no image in the {name} split")


class CUBDataset(Dataset):
    """One split: ``(image tensor, label 0..K-1)``, or ``None`` for an image that cannot be
    decoded (logged once per file, counted in ``skipped``)."""

    def __init__(self, samples: list[tuple[str, int, tuple | None]], classes: list[str],
                 transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = [label for _, label, _ in self.samples]
        self.transform = transform
        self.skipped = 0
        self.bad_files: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label, box = self.samples[index]
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")      # decodes the whole file
        except Exception as exc:                   # OSError, UnidentifiedImageError, ...
            self.skipped += 1
            if path not in self.bad_files:
                self.bad_files.add(path)
                log.warning("skipping unreadable image %s (%s)", path, exc.__class__.__name__)
            return None
        if box is not None:
            # clamp to the picture: some annotation tools round boxes a pixel past the border
            x0, y0, x1, y1 = box
            image = image.crop((max(0, int(x0)), max(0, int(y0)), min(image.width, int(round(x1))),
                                min(image.height, int(round(y1)))))
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def cub_transforms(size: int = 224, test_resize: int = 256) -> tuple[Callable, Callable]:
    """Train: RandomResizedCrop(size) + horizontal flip; test: Resize(test_resize) +
    CenterCrop(size); both with ImageNet normalisation (the weights were trained with it)."""
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(test_resize), T.CenterCrop(size), T.ToTensor(), norm])
    return train, test


def build_datasets(cfg) -> tuple[Dataset, CUBDataset]:
    """(train, test) from DATA.ROOT at MODEL.INPUT_SIZE; DATA.LIMIT_TRAIN > 0 keeps the first N
    training images."""
    if str(cfg.DATA.NAME).lower() != "cub200":
        raise ConfigError(f"DATA.NAME must be cub200 for transfer, got {cfg.DATA.NAME!r}")
    root = str(cfg.DATA.ROOT or "")
    if not root:
        raise DatasetError(f"DATA.ROOT is not set; point it at the CUB_200_2011 folder ({LAYOUT})")
    index = CUBIndex(root, bool(cfg.DATA.CROP_BOXES))
    size = list(cfg.MODEL.INPUT_SIZE)
    if size[1] != size[2]:
        raise ConfigError(f"MODEL.INPUT_SIZE must be square for CUB, got {size}")
    resize = int(cfg.DATA.TEST_RESIZE)
    if resize < int(size[2]):
        raise ConfigError(f"DATA.TEST_RESIZE ({resize}) must be >= the crop size {size[2]}")
    train_tf, test_tf = cub_transforms(int(size[2]), resize)
    train = CUBDataset(index.samples["train"], index.classes, train_tf)
    test = CUBDataset(index.samples["test"], index.classes, test_tf)
    log.info("%s: %d train / %d test images in %d classes", index.root, len(train), len(test),
             len(index.classes))
    limit = int(cfg.DATA.LIMIT_TRAIN or 0)
    return (Subset(train, range(min(limit, len(train)))) if limit > 0 else train), test


def num_classes_of(datasets) -> int:
    test = datasets[1]
    return len(test.classes)
