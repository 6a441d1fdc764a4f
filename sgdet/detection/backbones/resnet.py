"""SG-ResNet50 backbones (and the dense ResNet50 baselines) for Faster R-CNN.

C4 layout (the paper's, as in jwyang/faster-rcnn.pytorch which it used): ``conv1 .. layer3`` is
the backbone (stride 16, 1024 channels for ResNet50) and ``layer4`` + global average pooling is
the RoI box head (2048-d representation). FPN layout: ``layer1 .. layer4`` (strides 4..32, 256 /
512 / 1024 / 2048 channels) feed torchvision's FeaturePyramidNetwork (256 channels).

The SGConv2d layers of a compressed checkpoint are kept with their masks and groups, so pruned
connections stay pruned through detection training (the masked forward gives them zero
gradient)."""
from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import nn

from .common import (FPNBackbone, PooledRoIHead, SingleFeatureBackbone, check_freeze_at,
                     feature_channels, freeze, load_classifier)
from .registry import BACKBONE_REGISTRY


def _stages(model: nn.Module) -> list[list[nn.Module]]:
    """Freezable stages, detectron2 numbering: stem (conv1 + bn1), then layer1, layer2, layer3."""
    return [[model.conv1, model.bn1], [model.layer1], [model.layer2], [model.layer3]]


def resnet_c4(arch: str, weights=None, masked: bool = True, deploy: bool = False,
              freeze_at: int = 2, freeze_bn: bool = True) -> SingleFeatureBackbone:
    """ResNet cut for the C4 layout: body ``conv1..layer3`` (stride 16), box head ``layer4``.

    ``freeze_at``: stages kept fixed, counting the stem as 1 (default 2: stem + layer1, as
    faster-rcnn.pytorch's FIXED_BLOCKS=1). ``freeze_bn``: BatchNorms stay in eval mode, untrained."""
    check_freeze_at(freeze_at, 4)
    model = load_classifier(arch, weights, masked, torchvision.models.ResNet, deploy)
    body = nn.Sequential(OrderedDict(
        conv1=model.conv1, bn1=model.bn1, relu=model.relu, maxpool=model.maxpool,
        layer1=model.layer1, layer2=model.layer2, layer3=model.layer3))
    channels, representation = feature_channels(body, model.layer4)
    head = PooledRoIHead(model.layer4, representation, freeze_bn=freeze_bn)
    freeze(m for stage in _stages(model)[:freeze_at] for m in stage)
    return SingleFeatureBackbone(body, channels, stride=16, box_head=head, freeze_bn=freeze_bn)


def resnet_fpn(arch: str, weights=None, masked: bool = True, deploy: bool = False,
               freeze_at: int = 2, freeze_bn: bool = True, out_channels: int = 256) -> FPNBackbone:
    """ResNet with torchvision's FPN over ``layer1..layer4`` (the ``fc`` is dropped)."""
    check_freeze_at(freeze_at, 4)
    model = load_classifier(arch, weights, masked, torchvision.models.ResNet, deploy)
    freeze(m for stage in _stages(model)[:freeze_at] for m in stage)
    return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    from torchvision.models._utils import IntermediateLayerGetter
    in_channels = list(feature_channels(IntermediateLayerGetter(model, return_layers))[0].values())
    return FPNBackbone(model, return_layers, in_channels, out_channels, freeze_bn=freeze_bn)


@BACKBONE_REGISTRY.register()
def sg_resnet50(weights=None, **kwargs) -> SingleFeatureBackbone:
    """SG-ResNet50, C4 layout. ``weights``: a compressed resnet50 sgdet checkpoint (or a dense
    ``.pth``: full masks, compressible later; or None: random init)."""
    return resnet_c4("resnet50", weights, masked=True, **kwargs)


@BACKBONE_REGISTRY.register()
def sg_resnet50_fpn(weights=None, **kwargs) -> FPNBackbone:
    """SG-ResNet50 with an FPN."""
    return resnet_fpn("resnet50", weights, masked=True, **kwargs)


@BACKBONE_REGISTRY.register()
def resnet50(weights=None, **kwargs) -> SingleFeatureBackbone:
    """Dense ResNet50 baseline, C4 layout (Table 6's 'Baseline')."""
    return resnet_c4("resnet50", weights, masked=False, **kwargs)


@BACKBONE_REGISTRY.register()
def resnet50_fpn(weights=None, **kwargs) -> FPNBackbone:
    """Dense ResNet50 with an FPN."""
    return resnet_fpn("resnet50", weights, masked=False, **kwargs)
