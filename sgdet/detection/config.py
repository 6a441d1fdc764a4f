"""The detection pipeline's config schema: detectron2-style keys (MODEL.BACKBONE.NAME,
MODEL.WEIGHTS, DATASETS.TRAIN/TEST, INPUT.MIN_SIZE_TRAIN/TEST, SOLVER.*, OUTPUT_DIR) with the
paper's Faster R-CNN recipe as defaults (faster-rcnn.pytorch: batch 16, lr 0.01, decay after epoch
4, 10 epochs). configs/detection/*.yaml override these; a key not listed here is an error, and so
is a value that cannot run (``validate_config``: one line naming the key)."""
from __future__ import annotations

from sgdet.config import CfgNode
from sgdet.engine.validation import count_convention, positive_float, positive_int
from sgdet.errors import ConfigError

from .backbones import BACKBONE_REGISTRY


def get_defaults() -> CfgNode:
    cfg = CfgNode()
    cfg.OUTPUT_DIR = "out/detection"
    cfg.SEED = 0

    cfg.MODEL = CfgNode()
    cfg.MODEL.DEVICE = "auto"             # auto | cpu | cuda
    cfg.MODEL.WEIGHTS = ""                # compressed classification checkpoint (.sg.pt), dense
                                          # torchvision .pth, or a detector checkpoint (--eval-only)
    cfg.MODEL.BACKBONE = CfgNode()
    cfg.MODEL.BACKBONE.NAME = "sg_resnet50"   # a name in sgdet.BACKBONE_REGISTRY
    cfg.MODEL.BACKBONE.FREEZE_AT = 2      # stem + first stage fixed (faster-rcnn.pytorch)
    cfg.MODEL.BACKBONE.FREEZE_BN = True   # BatchNorm in eval mode, untrained
    cfg.MODEL.RPN = CfgNode()
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 12000
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2000
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 6000
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 300
    cfg.MODEL.ROI_HEADS = CfgNode()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 0   # object classes, background excluded (0: from the data)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
    cfg.MODEL.ROI_BOX_HEAD = CfgNode()
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 14   # C4 RoIAlign size (faster-rcnn.pytorch: 7)

    cfg.DATASETS = CfgNode()
    cfg.DATASETS.ROOT = ""                # relative dataset paths resolve here ("": $SGDET_DATASETS)
    cfg.DATASETS.TRAIN = ["coco_2014_trainval_minus_minival"]
    cfg.DATASETS.TEST = ["coco_2014_minival"]
    cfg.DATASETS.REGISTER = []            # your own: [[name, json_file, image_root], ...]

    cfg.INPUT = CfgNode()
    cfg.INPUT.MIN_SIZE_TRAIN = [600]      # several: one drawn per image (multi-scale training)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TEST = [300, 600]  # Table 6's two columns, both from one evaluation
    cfg.INPUT.MAX_SIZE_TEST = 1000
    cfg.INPUT.RANDOM_FLIP = True

    cfg.DATALOADER = CfgNode()
    cfg.DATALOADER.NUM_WORKERS = 4

    cfg.SOLVER = CfgNode()
    cfg.SOLVER.IMS_PER_BATCH = 16         # over all processes, as in detectron2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.EPOCHS = 10
    cfg.SOLVER.DECAY_EPOCHS = [4, 9]      # lr x GAMMA after these many epochs (epochs, not
                                          # iterations: faster-rcnn.pytorch's --lr_decay_step 4)
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.WARMUP_ITERS = 100         # linear warm-up from WARMUP_FACTOR x BASE_LR
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    cfg.SOLVER.CHECKPOINT_PERIOD = 500    # iterations between checkpoints (and one per epoch)
    cfg.SOLVER.AMP = False                # mixed precision where CUDA is used

    cfg.TEST = CfgNode()
    cfg.TEST.EVAL_PERIOD = 0              # evaluate every N epochs (0: only at the end)
    cfg.TEST.IMS_PER_BATCH = 2            # per process
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    cfg.TEST.DEPLOY = False               # evaluate the deployed (diverse group conv) form
    cfg.TEST.COUNT_CONVENTION = "sgdet"   # Params/FLOPs of the table: sgdet | paper (sgdet.count)
    return cfg


def validate_config(cfg, training: bool = True) -> None:
    """Reject values that cannot run, naming the key (one-line ConfigError)."""
    positive_int(cfg.SEED, "SEED", 0)
    if str(cfg.MODEL.DEVICE).lower() not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"MODEL.DEVICE must be auto, cpu or cuda, got {cfg.MODEL.DEVICE!r}")
    if not str(cfg.OUTPUT_DIR):
        raise ConfigError("OUTPUT_DIR must be set")
    if cfg.MODEL.BACKBONE.NAME not in BACKBONE_REGISTRY:
        names = ", ".join(sorted(name for name, _ in BACKBONE_REGISTRY))
        raise ConfigError(f"unknown MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r}; registered: {names}")
    positive_int(cfg.MODEL.BACKBONE.FREEZE_AT, "MODEL.BACKBONE.FREEZE_AT", 0)
    for key in ("BATCH_SIZE_PER_IMAGE", "PRE_NMS_TOPK_TRAIN", "POST_NMS_TOPK_TRAIN",
                "PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TEST"):
        positive_int(cfg.MODEL.RPN[key], f"MODEL.RPN.{key}")
    positive_int(cfg.MODEL.ROI_HEADS.NUM_CLASSES, "MODEL.ROI_HEADS.NUM_CLASSES", 0)
    positive_int(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    for key in ("SCORE_THRESH_TEST", "NMS_THRESH_TEST"):
        value = positive_float(cfg.MODEL.ROI_HEADS[key], f"MODEL.ROI_HEADS.{key}", allow_zero=True)
        if value > 1:
            raise ConfigError(f"MODEL.ROI_HEADS.{key} must be in [0, 1], got {value}")
    positive_int(cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION")
    for entry in cfg.DATASETS.REGISTER:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, str) for v in entry)):
            raise ConfigError(f"DATASETS.REGISTER entries are [name, json_file, image_root], got {entry!r}")
    if training and not list(cfg.DATASETS.TRAIN):
        raise ConfigError("DATASETS.TRAIN is empty; name at least one registered dataset")
    if not list(cfg.DATASETS.TEST):
        raise ConfigError("DATASETS.TEST is empty; name at least one registered dataset")
    for key in ("MIN_SIZE_TRAIN", "MIN_SIZE_TEST"):
        sizes = list(cfg.INPUT[key])
        if not sizes:
            raise ConfigError(f"INPUT.{key} is empty")
        for v in sizes:
            positive_int(v, f"INPUT.{key} entries", 8)
    positive_int(cfg.INPUT.MAX_SIZE_TRAIN, "INPUT.MAX_SIZE_TRAIN", 8)
    positive_int(cfg.INPUT.MAX_SIZE_TEST, "INPUT.MAX_SIZE_TEST", 8)
    positive_int(cfg.DATALOADER.NUM_WORKERS, "DATALOADER.NUM_WORKERS", 0)
    positive_int(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    positive_float(cfg.SOLVER.BASE_LR, "SOLVER.BASE_LR")
    positive_float(cfg.SOLVER.MOMENTUM, "SOLVER.MOMENTUM", allow_zero=True)
    positive_float(cfg.SOLVER.WEIGHT_DECAY, "SOLVER.WEIGHT_DECAY", allow_zero=True)
    positive_int(cfg.SOLVER.EPOCHS, "SOLVER.EPOCHS", 0)
    for e in cfg.SOLVER.DECAY_EPOCHS:
        positive_int(e, "SOLVER.DECAY_EPOCHS entries")
    positive_float(cfg.SOLVER.GAMMA, "SOLVER.GAMMA")
    positive_int(cfg.SOLVER.WARMUP_ITERS, "SOLVER.WARMUP_ITERS", 0)
    factor = positive_float(cfg.SOLVER.WARMUP_FACTOR, "SOLVER.WARMUP_FACTOR")
    if factor > 1:
        raise ConfigError(f"SOLVER.WARMUP_FACTOR must be in (0, 1], got {factor}")
    positive_int(cfg.SOLVER.CHECKPOINT_PERIOD, "SOLVER.CHECKPOINT_PERIOD", 0)
    positive_int(cfg.TEST.EVAL_PERIOD, "TEST.EVAL_PERIOD", 0)
    positive_int(cfg.TEST.IMS_PER_BATCH, "TEST.IMS_PER_BATCH")
    positive_int(cfg.TEST.DETECTIONS_PER_IMAGE, "TEST.DETECTIONS_PER_IMAGE")
    count_convention(cfg.TEST.COUNT_CONVENTION, "TEST.COUNT_CONVENTION")
