"""COCO-format detection datasets for torchvision's Faster R-CNN, and a catalog of datasets by name.

A dataset is a COCO json (``images``, ``annotations``, ``categories``) plus an image folder. Items
are ``(image, target)``: a float image tensor [3, H, W] in 0..1 and a target dict with ``boxes``
(float [N, 4], xyxy in pixels), ``labels`` (int64, contiguous ids 1..K in order of increasing COCO
category id; 0 is the background), ``image_id``, ``area`` and ``iscrowd``. Crowd annotations and
boxes without area are left out of the targets (torchvision's reference does the same); the
evaluator reads them from the json.

Built-in names (the paper's split), resolved under ``root`` or ``$SGDET_DATASETS`` (default
``./datasets``), in ``<root>/coco``::

    coco/annotations/instances_train2014.json            coco/train2014/*.jpg
    coco/annotations/instances_valminusminival2014.json  coco/val2014/*.jpg
    coco/annotations/instances_minival2014.json

- ``coco_2014_trainval_minus_minival``: train2014 + val2014 minus the 5k minival (training)
- ``coco_2014_minival``: the 5k minival images (evaluation)
- also ``coco_2014_train``, ``coco_2014_valminusminival``.

Your own data: ``register_coco_dataset("shapes_train", "shapes/train.json", "shapes/images")``,
then ``get_dataset("shapes_train")``. Problems are one-line :class:`sgdet.DatasetError` naming the
file and what is wrong.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from typing import Callable, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset

from ..errors import ConfigError, DatasetError

log = logging.getLogger("sgdet.detection")

#: name -> list of (json_file, image_root); relative paths are resolved under the datasets root.
DATASET_CATALOG: dict[str, list[tuple[str, str]]] = {}

_BUILTIN = {
    "coco_2014_train": [("coco/annotations/instances_train2014.json", "coco/train2014")],
    "coco_2014_valminusminival": [("coco/annotations/instances_valminusminival2014.json", "coco/val2014")],
    "coco_2014_minival": [("coco/annotations/instances_minival2014.json", "coco/val2014")],
}
_BUILTIN["coco_2014_trainval_minus_minival"] = (_BUILTIN["coco_2014_train"]
                                                + _BUILTIN["coco_2014_valminusminival"])


def register_coco_dataset(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike,
                          replace: bool = False) -> None:
    """Make the COCO-format dataset ``json_file`` + ``image_root`` known as ``name``. Registering a
    name again with other files is a ConfigError unless ``replace`` (a config's DATASETS.REGISTER
    entries replace, since the config is what the run is about); built-in names never change."""
    entry = [(os.fspath(json_file), os.fspath(image_root))]
    if name in _BUILTIN and _BUILTIN[name] != entry:
        raise ConfigError(f"dataset {name!r} is built in; register yours under another name")
    if name in DATASET_CATALOG and DATASET_CATALOG[name] != entry and not replace:
        raise ConfigError(f"dataset {name!r} is already registered (as {DATASET_CATALOG[name]})")
    DATASET_CATALOG[name] = entry


DATASET_CATALOG.update(_BUILTIN)


def datasets_root(root: str | os.PathLike | None = None) -> str:
    return os.fspath(root) if root is not None else os.environ.get("SGDET_DATASETS", "datasets")


def _fail(json_file: str, problem: str):
    raise DatasetError(f"{json_file}: {problem}")


def _read_json(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise DatasetError(f"annotation file not found: {json_file}")
    try:
        with open(json_file, "rb") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        _fail(json_file, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
    except UnicodeDecodeError:
        _fail(json_file, "malformed JSON: not UTF-8 text")
    if not isinstance(data, dict):
        _fail(json_file, f"expected a JSON object with images/annotations/categories, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            _fail(json_file, f"missing '{key}' list (not a COCO instances file?)")
    return data


def _validate(data: dict, json_file: str) -> None:
    category_ids, image_ids = set(), set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            _fail(json_file, f"category #{i} has no integer 'id'")
        category_ids.add(cat["id"])
    if not category_ids:
        _fail(json_file, "'categories' is empty")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            _fail(json_file, f"image #{i} needs an integer 'id' and a 'file_name'")
        if img["id"] in image_ids:
            _fail(json_file, f"image id {img['id']} appears twice")
        image_ids.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            _fail(json_file, f"annotation #{i} is not an object")
        ann_id = ann.get("id", f"#{i}")
        if ann.get("category_id") not in category_ids:
            _fail(json_file, f"annotation id {ann_id} has unknown category_id {ann.get('category_id')!r}")
        if ann.get("image_id") not in image_ids:
            _fail(json_file, f"annotation id {ann_id} refers to unknown image_id {ann.get('image_id')!r}")
        box = ann.get("bbox")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            _fail(json_file, f"annotation id {ann_id} has a malformed bbox {box!r} (want [x, y, w, h])")
        if not all(math.isfinite(v) for v in box) or any(v < 0 for v in box):
            # min(64.0, nan) is 64.0: a NaN would silently become a real box
            _fail(json_file, f"annotation id {ann_id} has a non-finite or negative bbox value {box!r}")


class COCODetection(Dataset):
    """One COCO-format json + image folder. ``check_images`` (default) verifies up front that every
    image file exists, naming the first missing one. ``transforms(image, target)`` is applied last.
    ``category_ids``: the COCO category ids in contiguous order (label k is ``category_ids[k-1]``);
    default: the json's ids sorted."""

    def __init__(self, json_file: str | os.PathLike, image_root: str | os.PathLike,
                 transforms: Callable | None = None, check_images: bool = True,
                 category_ids: Sequence[int] | None = None) -> None:
        self.json_file, self.image_root = os.fspath(json_file), os.fspath(image_root)
        self.transforms = transforms
        data = _read_json(self.json_file)
        _validate(data, self.json_file)
        self.data = data
        own = sorted(c["id"] for c in data["categories"])
        if category_ids is not None and sorted(category_ids) != own:
            _fail(self.json_file, f"categories {own} differ from the other parts' {sorted(category_ids)}")
        self.category_ids = list(category_ids) if category_ids is not None else own
        self.category_to_label = {c: k + 1 for k, c in enumerate(self.category_ids)}
        self.label_to_category = {k: c for c, k in self.category_to_label.items()}
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self.images = sorted(data["images"], key=lambda img: img["id"])
        self._anns: dict[int, list[dict]] = {img["id"]: [] for img in self.images}
        for ann in data["annotations"]:
            self._anns[ann["image_id"]].append(ann)
        self.clipped, self.dropped = self._count_clipping()
        if self.clipped or self.dropped:
            log.info("%s: %d boxes clipped to their image, %d dropped as empty", self.json_file,
                     self.clipped, self.dropped)
        if check_images:
            for img in self.images:
                path = os.path.join(self.image_root, img["file_name"])
                if not os.path.isfile(path):
                    raise DatasetError(f"image file not found: {path} (image id {img['id']} in {self.json_file})")
        self._coco = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def coco(self):
        """The json as a pycocotools ``COCO`` (for :func:`sgdet.detection.evaluation.evaluate_coco`)."""
        if self._coco is None:
            from pycocotools.coco import COCO
            coco = COCO()
            coco.dataset = self.data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def _count_clipping(self) -> tuple[int, int]:
        """Boxes that reach outside their image (clipped when loaded) or are empty once clipped
        (dropped), for images whose json entry gives width and height."""
        clipped = dropped = 0
        for img in self.images:
            width, height = img.get("width"), img.get("height")
            if not isinstance(width, (int, float)) or not isinstance(height, (int, float)):
                continue
            for ann in self._anns[img["id"]]:
                if ann.get("iscrowd", 0):
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                if min(float(width), x + w) <= x or min(float(height), y + h) <= y:
                    dropped += 1
                elif x + w > width or y + h > height:
                    clipped += 1
        return clipped, dropped

    def _target(self, img: dict, width: int, height: int) -> dict:
        boxes, labels, areas = [], [], []
        for ann in self._anns[img["id"]]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(width), x + w), min(float(height), y + h)
            if x1 <= x0 or y1 <= y0:
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.category_to_label[ann["category_id"]])
            areas.append(float(ann.get("area", w * h)))
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "image_id": int(img["id"]),
                "area": torch.tensor(areas, dtype=torch.float32),
                "iscrowd": torch.zeros(len(labels), dtype=torch.int64)}

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor
        img = self.images[index]
        path = os.path.join(self.image_root, img["file_name"])
        if not os.path.isfile(path):
            raise DatasetError(f"image file not found: {path} (image id {img['id']} in {self.json_file})")
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc.__class__.__name__}") from None
        tensor = pil_to_tensor(image).float().div_(255)
        target = self._target(img, image.width, image.height)
        if self.transforms is not None:
            tensor, target = self.transforms(tensor, target)
        return tensor, target


class ConcatCOCODetection(ConcatDataset):
    """Several COCO parts with one label mapping (e.g. train2014 + valminusminival2014)."""

    def __init__(self, parts: Sequence[COCODetection]) -> None:
        super().__init__(parts)
        self.category_ids = parts[0].category_ids
        self.label_to_category = parts[0].label_to_category
        self.category_names = parts[0].category_names


def get_dataset(name: str, root: str | os.PathLike | None = None, transforms: Callable | None = None,
                check_images: bool = True, category_ids: Sequence[int] | None = None
                ) -> COCODetection | ConcatCOCODetection:
    """The registered dataset ``name``; relative paths resolve under ``root`` (default
    ``$SGDET_DATASETS``, else ``./datasets``). ``category_ids``: the label order to use (that of
    another dataset trained together with this one; default: this json's sorted ids)."""
    if name not in DATASET_CATALOG:
        raise ConfigError(f"unknown dataset {name!r}; registered: {', '.join(sorted(DATASET_CATALOG))}")
    base = datasets_root(root)
    entries = DATASET_CATALOG[name]
    if any(not os.path.isabs(j) or not os.path.isabs(r) for j, r in entries) and not os.path.isdir(base):
        raise DatasetError(f"datasets root not found: {base} (set $SGDET_DATASETS or pass root=)")
    parts: list[COCODetection] = []
    for json_file, image_root in entries:
        parts.append(COCODetection(os.path.join(base, json_file), os.path.join(base, image_root),
                                   transforms, check_images,
                                   category_ids=parts[0].category_ids if parts else category_ids))
    return parts[0] if len(parts) == 1 else ConcatCOCODetection(parts)


class RandomHorizontalFlip:
    """Training augmentation of faster-rcnn.pytorch (flipped images): ``transforms(image,
    target)`` mirroring the image and its boxes with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p, self.generator = float(p), generator

    def __call__(self, image: torch.Tensor, target: dict):
        if float(torch.rand((), generator=self.generator)) >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        return image.flip(-1), target


def collate(batch):
    """DataLoader collate for detection: (images tuple, targets tuple)."""
    return tuple(zip(*batch))
