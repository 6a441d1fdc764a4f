"""COCO box evaluation (pycocotools) of torchvision detector outputs, and Table 6's rows."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from typing import Iterable, Mapping, Sequence

import torch

from ..checkpoint import plain
from ..counting import format_count
from ..errors import ConfigError
from ..files import write_text

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_and_mapping(coco_gt, label_to_category):
    """(pycocotools COCO, {contiguous label: category id}) from a COCO, a json path or a dataset."""
    mapping = label_to_category
    if isinstance(coco_gt, (str, os.PathLike)):
        from .datasets import _read_json, _validate
        from pycocotools.coco import COCO
        path = os.fspath(coco_gt)
        data = _read_json(path)
        _validate(data, path)
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    elif hasattr(coco_gt, "coco") and hasattr(coco_gt, "label_to_category"):   # COCODetection
        coco = coco_gt.coco
        mapping = mapping if mapping is not None else coco_gt.label_to_category
    elif hasattr(coco_gt, "getCatIds") and hasattr(coco_gt, "loadRes"):
        coco = coco_gt
    else:
        raise ConfigError(f"coco_gt must be a pycocotools COCO, a json path or a COCODetection, "
                          f"not {type(coco_gt).__name__}")
    if mapping is None:   # the datasets' rule: contiguous labels follow sorted category ids
        mapping = {k + 1: c for k, c in enumerate(sorted(coco.getCatIds()))}
    return coco, {int(k): int(v) for k, v in mapping.items()}


def _pairs(detections) -> Iterable[tuple[int, Mapping]]:
    if isinstance(detections, Mapping):
        return detections.items()
    return detections


def to_coco_results(detections, label_to_category: Mapping[int, int]) -> list[dict]:
    """COCO result entries ``{image_id, category_id, bbox [x, y, w, h], score}`` from
    ``{image_id: {'boxes' (xyxy), 'scores', 'labels'}}`` or a list of (image_id, output) pairs."""
    results = []
    for image_id, output in _pairs(detections):
        boxes = torch.as_tensor(output["boxes"], dtype=torch.float64).reshape(-1, 4).cpu()
        scores = torch.as_tensor(output["scores"], dtype=torch.float64).reshape(-1).cpu()
        labels = torch.as_tensor(output["labels"]).reshape(-1).cpu()
        if not len(boxes) == len(scores) == len(labels):
            raise ConfigError(f"detections of image {image_id}: boxes, scores and labels differ in length")
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            if int(label) not in label_to_category:
                raise ConfigError(f"detections of image {image_id}: label {int(label)} has no COCO "
                                  f"category (labels are 1..{len(label_to_category)})")
            x0, y0, x1, y1 = box
            results.append({"image_id": int(image_id), "category_id": label_to_category[int(label)],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return results


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, batch_size: int = 2,
            device: str | torch.device = "cpu", progress: bool | None = False,
            desc: str = "predict") -> dict[int, dict[str, torch.Tensor]]:
    """Run a torchvision detector in eval mode over a detection dataset (or a DataLoader of
    ``(images, targets)`` batches, e.g. one rank's shard): {image_id: output} with boxes in the
    original image's pixels, ready for :func:`evaluate_coco`."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from .datasets import collate
    loader = dataset if isinstance(dataset, DataLoader) else DataLoader(   # private generator: see
        dataset, batch_size=batch_size, collate_fn=collate,               # the engine's _val_loader
        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval().to(device)
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for images, targets in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                    disable=None if progress is None else not progress):
            results = model([image.to(device) for image in images])
            for target, result in zip(targets, results):
                outputs[int(target["image_id"])] = {k: v.cpu() for k, v in result.items()}
    finally:
        model.train(was_training)
    return outputs


def evaluate_coco(detections, coco_gt, label_to_category: Mapping[int, int] | None = None,
                  output_json: str | os.PathLike | None = None,
                  image_ids: Sequence[int] | None = None, verbose: bool = False) -> dict[str, float]:
    """COCO box AP (%) of torchvision detector outputs: {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}.

    ``detections``: {image_id: output} or (image_id, output) pairs, ``output`` as FasterRCNN returns
    it in eval mode (boxes xyxy in original-image pixels, contiguous labels). ``coco_gt``: a
    pycocotools COCO, a COCO json path, or a :class:`~sgdet.detection.datasets.COCODetection` (whose
    label mapping is then used). ``label_to_category``: contiguous label -> COCO category id
    (default: sorted category ids, the datasets' rule). ``output_json``: also write the COCO result
    list there. ``image_ids``: evaluate only these images (default: every image of ``coco_gt``,
    so an image without detections counts its objects as missed). A metric with no ground truth in
    its size range is NaN (pycocotools' -1)."""
    coco, mapping = _coco_and_mapping(coco_gt, label_to_category)
    results = to_coco_results(detections, mapping)
    unknown = sorted({r["image_id"] for r in results} - set(coco.getImgIds()))
    if unknown:
        raise ConfigError(f"detections for image id {unknown[0]}, which the ground truth lacks")
    if output_json is not None:
        write_text(output_json, json.dumps(plain(results)))     # atomic, as every output
    if not results:
        return {m: 0.0 for m in METRICS}
    from pycocotools.cocoeval import COCOeval
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        dt = coco.loadRes(results)
        evaluator = COCOeval(coco, dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {m: (100.0 * float(v) if v >= 0 else math.nan) for m, v in zip(METRICS, evaluator.stats[:6])}


TABLE6_COLUMNS = ("Model", "Params", "FLOPs", "mAP(300)", "mAP(600)")


def _map(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def format_table6_row(model: str, params: int, flops: int, map300: float | None = None,
                      map600: float | None = None, width: int = 28,
                      maps: Sequence[float | None] | None = None) -> str:
    """One Table 6 row: Params and FLOPs as the paper prints them (24.44M, 4.09G; see
    :func:`sgdet.detection.detector_counts`), mAP (AP@[.5:.95], %) at 300 and 600 input (or the
    values ``maps`` of other test sizes), '-' when not run."""
    values = (map300, map600) if maps is None else tuple(maps)
    cells = (format_count(params), format_count(flops), *(_map(v) for v in values))
    return f"{model:<{width}}" + "".join(f"{c:>10}" for c in cells)


def format_table6(rows: Iterable[Mapping], width: int = 28, sizes: Sequence[int | str] | None = None) -> str:
    """Header plus one row per ``{'model', 'params', 'flops', 'map300', 'map600'}``; with
    ``sizes`` one mAP column per test size, read from each row's ``{'ap': {size: AP}}``."""
    columns = TABLE6_COLUMNS if sizes is None else (*TABLE6_COLUMNS[:3], *(f"mAP({s})" for s in sizes))
    lines = [f"{columns[0]:<{width}}" + "".join(f"{c:>10}" for c in columns[1:])]
    for row in rows:
        maps = None if sizes is None else [row.get("ap", {}).get(str(s)) for s in sizes]
        lines.append(format_table6_row(row["model"], row["params"], row["flops"], row.get("map300"),
                                       row.get("map600"), width, maps))
    return "\n".join(lines)
