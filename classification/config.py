"""The classification pipeline's config schema (every key a run may set, with its default) and its
validation. Configs under configs/classification/ override these; anything not listed here is an
error, and so is a value that cannot run (``validate_config``: one line naming the key)."""
from __future__ import annotations

import sgdet
from sgdet.compress import validate_arguments as validate_sg_arguments
from sgdet.config import CfgNode
from sgdet.engine.validation import count_convention, positive_float, positive_int
from sgdet.errors import ConfigError
from sgdet.grouping import GROUPINGS

SCHEMES = ("G", "LG", "L")
#: `compare`'s methods: self-grouping, fixed equal groups (CondenseNet-style), unstructured L1
#: magnitude pruning (torch.nn.utils.prune), structured channel pruning (Torch-Pruning)
COMPARE_METHODS = ("sg", "fixed", "unstructured", "channel")


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
    cfg.SOLVER.CHECKPOINT_PERIOD = 0   # iterations between checkpoints inside an epoch (0: none;
                                       # one comes after every epoch and pruning step anyway)

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
    cfg.SG.GROUPING = "kmeans"     # kmeans: self-grouping | fixed: equal groups by filter index
                                   # (CondenseNet's split, the same centroid pruning)

    cfg.COUNT = CfgNode()
    cfg.COUNT.CONVENTION = "sgdet"  # how results count Params/FLOPs: sgdet (every parameter, BN
                                   # included) | paper (the authors' counter: sgdet.count docs)

    cfg.SWEEP = CfgNode()
    cfg.SWEEP.KEY = "SG.GROUPS"    # the config key the sweep varies; "A,B" varies several
                                   # keys together (each value then a list [a, b])
    cfg.SWEEP.VALUES = []

    # `compare`: one baseline compressed by every METHOD to the same budget (classification/compare.py)
    cfg.COMPARE = CfgNode()
    cfg.COMPARE.BUDGET = "params"  # params | flops: what the budget counts (sgdet.count)
    cfg.COMPARE.RATIOS = [0.9, 0.95]   # fractions of the baseline's params (or FLOPs) removed
    cfg.COMPARE.METHODS = list(COMPARE_METHODS)
    cfg.COMPARE.UNSTRUCTURED = "global"    # global | layer: L1 magnitude ranked network-wide or per layer
    cfg.COMPARE.TOLERANCE = 0.01   # allowed |achieved - target| pruned fraction of the baseline
    cfg.COMPARE.BASELINE_EPOCHS = 10   # baseline training when MODEL.WEIGHTS is empty
    cfg.COMPARE.BASELINE_LR = 0.05
    cfg.COMPARE.TIMING_BATCH = 64  # images per timed forward pass (CPU)
    cfg.COMPARE.TIMING_REPEATS = 20
    cfg.COMPARE.TIMING_THREADS = 0     # torch threads while timing (0: leave torch's setting)
    return cfg


def _validate_compare(c) -> None:
    if c.BUDGET not in ("params", "flops"):
        raise ConfigError(f"COMPARE.BUDGET must be params or flops, got {c.BUDGET!r}")
    ratios = list(c.RATIOS)
    if not ratios:
        raise ConfigError("COMPARE.RATIOS is empty; list the fractions of the baseline to remove")
    for r in ratios:
        ok = isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < 1
        if not ok:
            raise ConfigError(f"COMPARE.RATIOS entries must be numbers in (0, 1), got {r!r}")
    if len(set(round(float(r), 6) for r in ratios)) != len(ratios):
        raise ConfigError(f"COMPARE.RATIOS has a repeated entry: {ratios}")
    methods = list(c.METHODS)
    if not methods:
        raise ConfigError(f"COMPARE.METHODS is empty; choose from {', '.join(COMPARE_METHODS)}")
    for m in methods:
        if m not in COMPARE_METHODS:
            raise ConfigError(f"COMPARE.METHODS has unknown method {m!r}; choose from "
                              f"{', '.join(COMPARE_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"COMPARE.METHODS names a method twice: {methods}")
    if c.UNSTRUCTURED not in ("global", "layer"):
        raise ConfigError(f"COMPARE.UNSTRUCTURED must be global or layer, got {c.UNSTRUCTURED!r}")
    tolerance = positive_float(c.TOLERANCE, "COMPARE.TOLERANCE")
    if tolerance >= 1:
        raise ConfigError(f"COMPARE.TOLERANCE must be below 1, got {c.TOLERANCE!r}")
    positive_int(c.BASELINE_EPOCHS, "COMPARE.BASELINE_EPOCHS", 0)
    positive_float(c.BASELINE_LR, "COMPARE.BASELINE_LR")
    positive_int(c.TIMING_BATCH, "COMPARE.TIMING_BATCH")
    positive_int(c.TIMING_REPEATS, "COMPARE.TIMING_REPEATS")
    positive_int(c.TIMING_THREADS, "COMPARE.TIMING_THREADS", 0)


def validate_config(cfg) -> None:
    """Reject a config whose values cannot run, naming the key (a ConfigError, one line)."""
    positive_int(cfg.SEED, "SEED", 0)
    if str(cfg.DEVICE).lower() not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"DEVICE must be auto, cpu or cuda, got {cfg.DEVICE!r}")
    if not str(cfg.OUTPUT_DIR):
        raise ConfigError("OUTPUT_DIR must be set")
    size = list(cfg.MODEL.INPUT_SIZE)
    if len(size) != 3 or not all(isinstance(v, int) and v >= 1 for v in size):
        raise ConfigError(f"MODEL.INPUT_SIZE must be [C, H, W] positive integers, got {size}")
    positive_int(cfg.MODEL.NUM_CLASSES, "MODEL.NUM_CLASSES", 0)
    positive_int(cfg.MODEL.WEIGHTS_EPOCHS, "MODEL.WEIGHTS_EPOCHS", 0)
    if cfg.MODEL.ARCH not in sgdet.ARCHITECTURES:
        raise ConfigError(f"unknown MODEL.ARCH {cfg.MODEL.ARCH!r}; choose from: "
                          f"{', '.join(sorted(sgdet.ARCHITECTURES))}")
    positive_int(cfg.DATA.BATCH_SIZE, "DATA.BATCH_SIZE")
    positive_int(cfg.DATA.TEST_BATCH_SIZE, "DATA.TEST_BATCH_SIZE")
    positive_int(cfg.DATA.WORKERS, "DATA.WORKERS", 0)
    positive_int(cfg.DATA.LIMIT_TRAIN, "DATA.LIMIT_TRAIN", 0)
    positive_int(cfg.SOLVER.EPOCHS, "SOLVER.EPOCHS", 0)
    positive_int(cfg.SOLVER.EVAL_PERIOD, "SOLVER.EVAL_PERIOD", 0)
    positive_int(cfg.SOLVER.CHECKPOINT_PERIOD, "SOLVER.CHECKPOINT_PERIOD", 0)
    positive_float(cfg.SOLVER.LR, "SOLVER.LR")
    positive_float(cfg.SOLVER.MOMENTUM, "SOLVER.MOMENTUM", allow_zero=True)
    positive_float(cfg.SOLVER.WEIGHT_DECAY, "SOLVER.WEIGHT_DECAY", allow_zero=True)
    positive_float(cfg.SOLVER.GAMMA, "SOLVER.GAMMA")
    if cfg.SOLVER.SCHEDULE not in ("multistep", "cosine", "constant"):
        raise ConfigError(f"SOLVER.SCHEDULE must be multistep, cosine or constant, got {cfg.SOLVER.SCHEDULE!r}")
    for m in cfg.SOLVER.MILESTONES:
        positive_int(m, "SOLVER.MILESTONES entries")
    if str(cfg.SG.SCHEME).upper() not in SCHEMES:
        raise ConfigError(f"SG.SCHEME must be one of {', '.join(SCHEMES)}, got {cfg.SG.SCHEME!r}")
    validate_sg_arguments(cfg.SG.CONV_RATIO, cfg.SG.FC_RATIO, cfg.SG.GROUPS, cfg.SG.STEP, cfg.SEED,
                          cfg.SG.N_INIT)
    if cfg.SG.GROUPING not in GROUPINGS:
        raise ConfigError(f"SG.GROUPING must be one of {', '.join(GROUPINGS)}, got {cfg.SG.GROUPING!r}")
    positive_int(cfg.SG.LOCAL_EPOCHS, "SG.LOCAL_EPOCHS", 0)
    positive_float(cfg.SG.LOCAL_LR, "SG.LOCAL_LR")
    count_convention(cfg.COUNT.CONVENTION, "COUNT.CONVENTION")
    _validate_compare(cfg.COMPARE)
