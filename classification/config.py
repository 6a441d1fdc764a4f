"""The classification pipeline's config schema (every key a run may set, with its default).
Configs under configs/classification/ override these; anything not listed here is an error."""
from __future__ import annotations

from sgdet.config import CfgNode


def get_defaults() -> CfgNode:
    cfg = CfgNode()
    cfg.OUTPUT_DIR = "out/classification"
    cfg.SEED = 0
    cfg.DEVICE = "auto"            # auto | cpu | cuda
    cfg.AMP = True                 # mixed precision where CUDA is used
    cfg.CHANNELS_LAST = True       # memory format where CUDA is used

    cfg.MODEL = CfgNode()
    cfg.MODEL.ARCH = "resnet50"    # a registered sgdet architecture
    cfg.MODEL.NUM_CLASSES = 1000   # 0: the number of classes of the data
    cfg.MODEL.WEIGHTS = ""         # dense .pth or sgdet checkpoint, by local path
    cfg.MODEL.WEIGHTS_EPOCHS = 0   # epochs behind MODEL.WEIGHTS for the table (0: from an sgdet
                                   # checkpoint's meta, else shown as '?')
    cfg.MODEL.INPUT_SIZE = [3, 224, 224]

    cfg.DATA = CfgNode()
    cfg.DATA.NAME = "imagenet"     # imagenet (ImageFolder) | cifar10 | cifar100 | mnist | fashion-mnist
    cfg.DATA.ROOT = ""
    cfg.DATA.BATCH_SIZE = 128      # per process
    cfg.DATA.WORKERS = 4
    cfg.DATA.TEST_BATCH_SIZE = 256
    cfg.DATA.LIMIT_TRAIN = 0       # >0: use only the first N training samples (smoke runs)

    cfg.SOLVER = CfgNode()
    cfg.SOLVER.EPOCHS = 90
    cfg.SOLVER.LR = 0.1
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.SCHEDULE = "multistep"   # multistep | cosine | constant
    cfg.SOLVER.MILESTONES = [30, 60]
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.EVAL_PERIOD = 1     # evaluate every N training epochs (0: only at the end)

    cfg.SG = CfgNode()
    cfg.SG.SCHEME = "G"            # G: global only | LG: local + global | L: local only
    cfg.SG.CONV_RATIO = 0.6
    cfg.SG.FC_RATIO = 0.6
    cfg.SG.GROUPS = 16
    cfg.SG.STEP = 0.1
    cfg.SG.LOCAL_EPOCHS = 20
    cfg.SG.LOCAL_LR = 1e-4
    cfg.SG.INCLUDE = []
    cfg.SG.EXCLUDE = ["*downsample*"]
    cfg.SG.N_INIT = 1
    cfg.SG.EVAL_EACH_STEP = True   # evaluate after every pruning step (the curves of Figs. 4-6)

    cfg.SWEEP = CfgNode()
    cfg.SWEEP.KEY = "SG.GROUPS"    # the config key the sweep varies; "A,B" varies several
                                   # keys together (each value then a list [a, b])
    cfg.SWEEP.VALUES = []
    return cfg
