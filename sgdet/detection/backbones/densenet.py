"""SG-DenseNet201 backbones (and the dense DenseNet201 baselines) for Faster R-CNN.

C4 layout (decision: cut where ResNet's C4 is cut, at stride 16): the backbone is ``features``
up to and including ``denseblock3`` (conv0, norm0, pool0, denseblock1, transition1, denseblock2,
transition2, denseblock3): stride 16, 1792 channels for DenseNet201 (256 + 48 x 32), taken as the
block's concatenated output (DenseNet is pre-activation: the next BN-ReLU is the first op of
whatever reads it, here the RPN's conv and the RoI head's transition). The RoI box head is
``transition3`` (BN-ReLU-conv 1x1 to 896 channels and a stride-2 average pool, the counterpart of
ResNet layer4's stride 2) + ``denseblock4`` + ``norm5`` + ReLU, globally average-pooled to a
1920-d representation -- exactly the classification network's path to its classifier.

FPN layout: denseblock1, denseblock2, denseblock3 and norm5 (strides 4, 8, 16, 32; 256 / 512 /
1792 / 1920 channels) feed torchvision's FeaturePyramidNetwork."""
from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import nn

from .common import (FPNBackbone, PooledRoIHead, SingleFeatureBackbone, check_freeze_at,
                     feature_channels, freeze, load_classifier)
from .registry import BACKBONE_REGISTRY

_BODY = ("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2",
         "transition2", "denseblock3")
_HEAD = ("transition3", "denseblock4", "norm5")


def _stages(features: nn.Module) -> list[list[nn.Module]]:
    """Freezable stages: stem (conv0 + norm0), then each dense block with its transition."""
    f = features
    return [[f.conv0, f.norm0], [f.denseblock1, f.transition1], [f.denseblock2, f.transition2],
            [f.denseblock3]]


def densenet_c4(arch: str, weights=None, masked: bool = True, deploy: bool = False,
                freeze_at: int = 2, freeze_bn: bool = True) -> SingleFeatureBackbone:
    """DenseNet cut for the C4 layout (see the module docstring)."""
    check_freeze_at(freeze_at, 4)
    model = load_classifier(arch, weights, masked, torchvision.models.DenseNet, deploy)
    f = model.features
    body = nn.Sequential(OrderedDict((name, getattr(f, name)) for name in _BODY))
    stage = nn.Sequential(OrderedDict([(name, getattr(f, name)) for name in _HEAD]
                                      + [("relu5", nn.ReLU())]))
    channels, representation = feature_channels(body, stage)
    head = PooledRoIHead(stage, representation, freeze_bn=freeze_bn)
    freeze(m for s in _stages(f)[:freeze_at] for m in s)
    return SingleFeatureBackbone(body, channels, stride=16, box_head=head, freeze_bn=freeze_bn)


def densenet_fpn(arch: str, weights=None, masked: bool = True, deploy: bool = False,
                 freeze_at: int = 2, freeze_bn: bool = True, out_channels: int = 256) -> FPNBackbone:
    """DenseNet with torchvision's FPN over denseblock1..3 and norm5 (the classifier is dropped)."""
    check_freeze_at(freeze_at, 4)
    model = load_classifier(arch, weights, masked, torchvision.models.DenseNet, deploy)
    freeze(m for s in _stages(model.features)[:freeze_at] for m in s)
    return_layers = {"denseblock1": "0", "denseblock2": "1", "denseblock3": "2", "norm5": "3"}
    from torchvision.models._utils import IntermediateLayerGetter
    in_channels = list(feature_channels(IntermediateLayerGetter(model.features, return_layers))[0].values())
    return FPNBackbone(model.features, return_layers, in_channels, out_channels, freeze_bn=freeze_bn)


@BACKBONE_REGISTRY.register()
def sg_densenet201(weights=None, **kwargs) -> SingleFeatureBackbone:
    """SG-DenseNet201, C4 layout. ``weights``: a compressed densenet201 sgdet checkpoint (or a dense
    ``.pth``: full masks; or None: random init)."""
    return densenet_c4("densenet201", weights, masked=True, **kwargs)


@BACKBONE_REGISTRY.register()
def sg_densenet201_fpn(weights=None, **kwargs) -> FPNBackbone:
    """SG-DenseNet201 with an FPN."""
    return densenet_fpn("densenet201", weights, masked=True, **kwargs)


@BACKBONE_REGISTRY.register()
def densenet201(weights=None, **kwargs) -> SingleFeatureBackbone:
    """Dense DenseNet201 baseline, C4 layout."""
    return densenet_c4("densenet201", weights, masked=False, **kwargs)


@BACKBONE_REGISTRY.register()
def densenet201_fpn(weights=None, **kwargs) -> FPNBackbone:
    """Dense DenseNet201 with an FPN."""
    return densenet_fpn("densenet201", weights, masked=False, **kwargs)
