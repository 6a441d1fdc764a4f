"""Detection backbones cut from (compressed) classification networks, one family per file, and
their registry (detectron2 style). See :mod:`sgdet.detection.backbones.registry` for the contract and for
registering your own."""
from .common import FPNBackbone, PooledRoIHead, SingleFeatureBackbone, load_classifier
from .registry import BACKBONE_REGISTRY, Backbone, build_backbone, registered_backbones
from . import densenet, resnet  # noqa: F401  (register the built-in backbones)

__all__ = ["BACKBONE_REGISTRY", "Backbone", "build_backbone", "registered_backbones",
           "SingleFeatureBackbone", "FPNBackbone", "PooledRoIHead", "load_classifier"]
