"""The detection pipeline's config schema: detectron2-style keys (MODEL.BACKBONE.NAME,
MODEL.WEIGHTS, DATASETS.TRAIN/TEST, INPUT.MIN_SIZE_TRAIN/TEST, SOLVER.*, OUTPUT_DIR) with the
paper's Faster R-CNN recipe as defaults (faster-rcnn.pytorch: batch 16, lr 0.01, decay after epoch
4, 10 epochs). configs/*.yaml override these; a key not listed here is an error."""
from __future__ import annotations

from sgdet.config import CfgNode


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
    return cfg
