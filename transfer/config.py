"""The transfer pipeline's config schema: the classification schema (classification.config), so
the one Trainer reads DATA.BATCH_SIZE, SOLVER.* and MODEL.* unchanged, plus the keys CUB needs.
configs/transfer/ override these; anything not listed here is an error."""
from __future__ import annotations

from classification.config import get_defaults as classification_defaults
from classification.config import validate_config as validate_classification
from sgdet.config import CfgNode
from sgdet.engine.validation import positive_int
from sgdet.errors import ConfigError

NAMES = ("cub200", "digits")      # digits: scikit-learn's, for the worked example


def get_defaults() -> CfgNode:
    cfg = classification_defaults()
    cfg.OUTPUT_DIR = "out/transfer"
    cfg.MODEL.NUM_CLASSES = 200        # the new dense head (0: the classes of classes.txt)
    cfg.MODEL.SOURCE_CLASSES = 1000    # outputs of the head of a dense .pth in MODEL.WEIGHTS
    cfg.DATA.NAME = "cub200"           # cub200 | digits (scikit-learn's 8x8 digits, the example)
    cfg.DATA.ROOT = ""                 # the CUB_200_2011/ folder
    cfg.DATA.CROP_BOXES = False        # crop each image to bounding_boxes.txt first
    cfg.DATA.TEST_RESIZE = 256         # test: resize the short side, then centre-crop INPUT_SIZE
    cfg.DATA.BATCH_SIZE = 64
    cfg.DATA.TEST_BATCH_SIZE = 128
    # the same recipe for every model of a table (the paper's fair comparison)
    cfg.SOLVER.EPOCHS = 30
    cfg.SOLVER.LR = 0.01
    cfg.SOLVER.MILESTONES = [20]
    return cfg


def validate_config(cfg) -> None:
    validate_classification(cfg)
    if str(cfg.DATA.NAME).lower() not in NAMES:
        raise ConfigError(f"unknown DATA.NAME {cfg.DATA.NAME!r} for transfer; choose from: {', '.join(NAMES)}")
    positive_int(cfg.MODEL.SOURCE_CLASSES, "MODEL.SOURCE_CLASSES")
    positive_int(cfg.DATA.TEST_RESIZE, "DATA.TEST_RESIZE")
    if not isinstance(cfg.DATA.CROP_BOXES, bool):
        raise ConfigError(f"DATA.CROP_BOXES must be True or False, got {cfg.DATA.CROP_BOXES!r}")
