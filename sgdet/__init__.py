"""sgdet: self-grouping convolutional neural networks (SG-CNN) for any PyTorch CNN.

Public API (importing has no side effects beyond registering the built-in architectures; the
detection names load ``sgdet.detection`` on first use)::

    records = sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.6, groups=16, step=0.1, seed=0)
    sgdet.count(model, input_size=(3, 224, 224))     # {'params': ..., 'flops': ...} (MACs)
    fast = sgdet.deploy(model)                        # diverse group convolutions, same outputs
    sgdet.save(model, "m.sg.pt"); model = sgdet.load("m.sg.pt")
"""
from .checkpoint import layer_summary, load, save
from .compress import DEFAULT_EXCLUDE, StepRecord, compress, compressible_layers, convert, sg_layers
from .counting import count, count_flops, count_params
from . import deploy      # the package, callable: sgdet.deploy(model) runs deploy.deploy(model)
from .deploy import DiverseGroupConv2d, DiverseGroupLinear, GatheredBatchNorm2d, register_bn_conv_pairs
from .errors import CheckpointError, ConfigError, DatasetError, NumericalError, SGError
from .grouping import centroid_prune, group_filters, importance_vectors
from .layers import SGConv2d, SGLinear
from .models import ARCHITECTURES, build, load_dense_weights, register_arch

__version__ = "0.1.0"

__all__ = [
    "compress", "count", "deploy", "save", "load", "SGConv2d", "SGLinear",
    "DiverseGroupConv2d", "DiverseGroupLinear", "GatheredBatchNorm2d", "StepRecord",
    "compressible_layers", "convert", "sg_layers", "count_flops", "count_params", "layer_summary",
    "importance_vectors", "group_filters", "centroid_prune", "register_bn_conv_pairs",
    "ARCHITECTURES", "build", "register_arch", "load_dense_weights", "DEFAULT_EXCLUDE",
    "SGError", "ConfigError", "CheckpointError", "DatasetError", "NumericalError",
    "BACKBONE_REGISTRY", "build_backbone", "build_faster_rcnn", "detector_counts",
]

# Detection names load sgdet.detection (torchvision's detection models) on first use only:
# `import sgdet` stays free of detection code.
_DETECTION_NAMES = ("BACKBONE_REGISTRY", "build_backbone", "build_faster_rcnn", "detector_counts")


def __getattr__(name: str):
    if name in _DETECTION_NAMES:
        from . import detection
        return getattr(detection, name)
    raise AttributeError(f"module 'sgdet' has no attribute {name!r}")
