"""Stage 1 of the detection pipeline: what a run is built from. The datasets its config names
(``DATASETS.TRAIN/TEST``, ``DATASETS.REGISTER`` entries) and the detector: a torchvision Faster
R-CNN whose backbone is cut from a compressed classification checkpoint, or a saved detector."""
from __future__ import annotations

import logging
import os

from torch.utils.data import Dataset

import sgdet
from sgdet.checkpoint import peek
from sgdet.errors import CheckpointError, ConfigError

from .datasets import (ConcatCOCODetection, RandomHorizontalFlip, datasets_root, get_dataset,
                       register_coco_dataset)
from .faster_rcnn import build_faster_rcnn

log = logging.getLogger("sgdet.detection")


# ------------------------------------------------------------------------------------ datasets

def register_config_datasets(cfg) -> None:
    """DATASETS.REGISTER entries, relative paths under DATASETS.ROOT (or $SGDET_DATASETS)."""
    base = datasets_root(str(cfg.DATASETS.ROOT) or None)
    for name, json_file, image_root in cfg.DATASETS.REGISTER:
        register_coco_dataset(name, os.path.join(base, json_file), os.path.join(base, image_root),
                              replace=True)


def build_datasets(cfg, training: bool = True) -> tuple[Dataset | None, dict[str, Dataset]]:
    """(training set: every DATASETS.TRAIN name with one label order, or None; {name: test set})."""
    register_config_datasets(cfg)
    root = str(cfg.DATASETS.ROOT) or None
    train = None
    category_ids = None
    if training:
        flip = RandomHorizontalFlip(0.5) if cfg.INPUT.RANDOM_FLIP else None
        parts = []
        for name in cfg.DATASETS.TRAIN:
            ds = get_dataset(name, root, transforms=flip, category_ids=category_ids)
            category_ids = ds.category_ids
            parts.extend(ds.datasets if isinstance(ds, ConcatCOCODetection) else [ds])
        train = parts[0] if len(parts) == 1 else ConcatCOCODetection(parts)
    tests = {}
    for name in cfg.DATASETS.TEST:
        tests[name] = get_dataset(name, root, category_ids=category_ids)
        category_ids = category_ids or tests[name].category_ids
    return train, tests


def num_classes_of(cfg, datasets) -> int:
    """Object classes (background excluded): MODEL.ROI_HEADS.NUM_CLASSES, or the data's when 0."""
    found = len(datasets.category_ids)
    wanted = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if wanted and wanted != found:
        raise ConfigError(f"MODEL.ROI_HEADS.NUM_CLASSES is {wanted} but the datasets have {found} "
                          f"categories (set {found}, or 0 to follow the data)")
    return found


# -------------------------------------------------------------------------------------- model

def detector_label(cfg, meta: dict) -> str:
    """The Table 6 name of a run: the saved detector's, else from the backbone's checkpoint."""
    if meta.get("label"):
        return str(meta["label"])
    name = f"Faster R-CNN {cfg.MODEL.BACKBONE.NAME}"
    return f"{name} ({meta['backbone_label']})" if meta.get("backbone_label") else name


def _apply_inference_settings(model, cfg) -> None:
    """The config's test-time settings on a detector (also one loaded from a checkpoint)."""
    heads = model.roi_heads
    heads.score_thresh = float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    heads.nms_thresh = float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST)
    heads.detections_per_img = int(cfg.TEST.DETECTIONS_PER_IMAGE)


def build_detector(cfg, num_classes: int):
    """(detector, meta): a torchvision FasterRCNN over MODEL.BACKBONE.NAME whose backbone is cut
    from MODEL.WEIGHTS (a compressed classification checkpoint keeps its masks and groups), or
    the detector saved in MODEL.WEIGHTS (``model_final.pth``: evaluation or further training)."""
    path = os.path.expanduser(str(cfg.MODEL.WEIGHTS or ""))
    if path and not os.path.isfile(path):
        raise CheckpointError(f"MODEL.WEIGHTS not found: {path}")
    header = peek(path) if path else None
    if header is not None and (header.get("arch") or {}).get("name") == "faster_rcnn":
        model = sgdet.load(path)
        saved = int(model.roi_heads.box_predictor.cls_score.out_features)
        if saved != num_classes + 1:
            raise ConfigError(f"{path} detects {saved - 1} classes but the datasets have {num_classes}")
        meta = dict(getattr(model, "sgdet_meta", None) or {})
        model.transform.min_size = tuple(int(v) for v in cfg.INPUT.MIN_SIZE_TRAIN)
        model.transform.max_size = int(cfg.INPUT.MAX_SIZE_TRAIN)
    else:
        model = build_faster_rcnn(
            cfg.MODEL.BACKBONE.NAME, num_classes + 1, weights=path or None,
            min_size=tuple(int(v) for v in cfg.INPUT.MIN_SIZE_TRAIN),
            max_size=int(cfg.INPUT.MAX_SIZE_TRAIN),
            roi_size=int(cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION),
            backbone_kwargs={"freeze_at": int(cfg.MODEL.BACKBONE.FREEZE_AT),
                             "freeze_bn": bool(cfg.MODEL.BACKBONE.FREEZE_BN)},
            rpn_pre_nms_top_n_train=int(cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN),
            rpn_post_nms_top_n_train=int(cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN),
            rpn_pre_nms_top_n_test=int(cfg.MODEL.RPN.PRE_NMS_TOPK_TEST),
            rpn_post_nms_top_n_test=int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
            rpn_batch_size_per_image=int(cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE),
            box_batch_size_per_image=int(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE))
        meta = {"backbone_label": (header or {}).get("meta", {}).get("label")} if path else {}
    _apply_inference_settings(model, cfg)
    if path:
        log.info("loaded weights %s", path)
    return model, meta
