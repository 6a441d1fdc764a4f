"""Faster R-CNN (torchvision's) around a registered backbone, and the detector's Params / FLOPs as
Table 6 of the paper reports them.

Layouts:

- C4 (``sg_resnet50``, ``sg_densenet201``, ``resnet50``, ``densenet201``; the paper's, from
  jwyang/faster-rcnn.pytorch): one stride-16 feature map ``'0'``; an AnchorGenerator with one
  level (sizes 32..512, ratios 0.5/1/2: 15 anchors per position); faster-rcnn.pytorch's RPN head
  (3x3 conv to 512, :class:`C4RPNHead`); RoIAlign on ``'0'`` to
  ``roi_size`` x ``roi_size`` (14, Detectron's C4; faster-rcnn.pytorch uses 7); the backbone's
  last stage as the box head (a :class:`~sgdet.detection.backbones.PooledRoIHead`, 2048-d for ResNet50,
  1920-d for DenseNet201) and a FastRCNNPredictor.
- FPN (``*_fpn``): torchvision's standard FPN path (five anchor levels, MultiScaleRoIAlign over
  ``'0'..'3'`` to 7x7, TwoMLPHead of 1024).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from .backbones import build_backbone
from ..counting import count_flops, count_params
from ..errors import ConfigError
from ..models import register_arch


def build_faster_rcnn(backbone_name: str, num_classes: int, weights: str | None = None,
                      min_size: int = 600, max_size: int = 1000, roi_size: int = 14,
                      backbone_kwargs: dict | None = None, **kw) -> FasterRCNN:
    """A torchvision ``FasterRCNN`` over the registered backbone ``backbone_name``.

    ``num_classes`` counts the background (COCO: 81). ``weights``: the classification checkpoint
    the backbone is cut from (see :func:`sgdet.detection.backbones.build_backbone`). ``min_size`` /
    ``max_size``: the input resolution (the paper's 300 and 600 runs: ``min_size=300`` / ``600``).
    ``backbone_kwargs`` go to the backbone builder (``deploy=True`` for the deployed form,
    ``freeze_at``, ``freeze_bn``); other keywords go to ``FasterRCNN``."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
    backbone = build_backbone(backbone_name, weights=weights, **dict(backbone_kwargs or {}))
    head = backbone.take_box_head() if hasattr(backbone, "take_box_head") else getattr(backbone, "box_head", None)
    names = list(backbone.output_shape()) if hasattr(backbone, "output_shape") else ["0"]
    if head is None and names == ["0", "1", "2", "3", "pool"]:   # FPN: torchvision's defaults
        model = FasterRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **kw)
    else:   # C4 (or a user backbone's own maps): every anchor size on every map
        pooled = [n for n in names if n != "pool"]
        kw.setdefault("rpn_anchor_generator", AnchorGenerator(
            sizes=((32, 64, 128, 256, 512),) * len(names), aspect_ratios=((0.5, 1.0, 2.0),) * len(names)))
        kw.setdefault("rpn_head", C4RPNHead(backbone.out_channels,
                                            kw["rpn_anchor_generator"].num_anchors_per_location()[0]))
        kw.setdefault("box_roi_pool", MultiScaleRoIAlign(featmap_names=pooled, output_size=roi_size,
                                                         sampling_ratio=2))
        if head is None:    # no stage to continue with: torchvision's TwoMLPHead
            model = FasterRCNN(backbone, num_classes=num_classes, min_size=min_size,
                               max_size=max_size, **kw)
        else:
            model = FasterRCNN(backbone, num_classes=None, min_size=min_size, max_size=max_size,
                               box_head=head, box_predictor=FastRCNNPredictor(head.representation_size,
                                                                              num_classes), **kw)
    model.sgdet_detector = {"backbone": backbone_name, "num_classes": num_classes,
                            "min_size": min_size, "max_size": max_size, "roi_size": roi_size}
    rebuild = {k: v for k, v in kw.items() if _is_plain(v)}     # modules passed in cannot be stored
    model.sgdet_arch = {"name": "faster_rcnn", "kwargs": {
        "backbone_name": backbone_name, "num_classes": num_classes, "min_size": min_size,
        "max_size": max_size, "roi_size": roi_size, "backbone_kwargs": dict(backbone_kwargs or {}),
        **rebuild}}
    return model


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


@register_arch("faster_rcnn")
def faster_rcnn(backbone_name: str, num_classes: int, backbone_kwargs: dict | None = None, **kw) -> FasterRCNN:
    """The skeleton :func:`sgdet.load` rebuilds a saved detector into (random weights: the
    checkpoint's tensors, SG masks and deployed layers are then restored), so
    ``sgdet.save(detector, path)`` / ``sgdet.load(path)`` round-trip a detector built by
    :func:`build_faster_rcnn` like any classification network."""
    return build_faster_rcnn(backbone_name, num_classes, weights=None,
                             backbone_kwargs=backbone_kwargs, **kw)


class C4RPNHead(nn.Module):
    """The RPN head of faster-rcnn.pytorch: 3x3 conv to ``mid_channels`` (512) + ReLU, then 1x1
    objectness and box-delta convs. torchvision's RPNHead keeps the input width (a 1792 -> 1792
    conv for DenseNet201, 29M params); this one does not."""

    def __init__(self, in_channels: int, num_anchors: int, mid_channels: int = 512) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 3, padding=1), nn.ReLU(inplace=True))
        self.cls_logits = nn.Conv2d(mid_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(mid_channels, num_anchors * 4, 1)
        for layer in (self.conv[0], self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[torch.Tensor]):
        logits, deltas = [], []
        for feature in features:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


class _Trunk(nn.Module):
    """backbone -> box head over the whole image -> predictor: the classification network with its
    classifier replaced by the detection predictor, as Table 6 counts it."""

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head, self.predictor = backbone, head, predictor

    def forward(self, x: torch.Tensor):
        features = self.backbone(x)
        return self.predictor(self.head(features["0"] if isinstance(features, dict) else features))


class _FPNCost(nn.Module):
    """backbone + FPN over the image, then box head and predictor on one 7x7 RoI."""

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module, roi_shape) -> None:
        super().__init__()
        self.backbone, self.head, self.predictor = backbone, head, predictor
        self.roi_shape = tuple(roi_shape)

    def forward(self, x: torch.Tensor):
        self.backbone(x)
        return self.predictor(self.head(x.new_zeros((1,) + self.roi_shape)))


def detector_counts(model: FasterRCNN, input_size: Sequence[int] = (3, 224, 224),
                    convention: str = "sgdet") -> dict[str, int]:
    """Params and FLOPs of a Faster R-CNN built by :func:`build_faster_rcnn`, Table 6's way
    (``convention``: sgdet.count's; "paper" counts backbone, head and predictor as one network).

    - ``params``: backbone + RoI box head + box predictor (pruned connections not counted, BN and
      biases counted). For C4 this is the classification network with its 1000-way fc replaced by
      the detection predictor (ResNet50, 81 classes: 24.34M; Table 6 prints 24.44M). The RPN is
      left out, as the paper's numbers leave it out; it is reported apart as ``rpn_params``, and
      every parameter of the detector as ``total_params``.
    - ``flops``: multiply-accumulates of one ``input_size`` image (default 3x224x224, the paper's
      convention: its baseline's 4.09G is ResNet50 at 224) through backbone -> box head applied to
      the whole feature map -> predictor, i.e. the classification-network FLOPs. For FPN
      backbones: backbone + FPN on the image plus the box head and predictor on one RoI.
    """
    backbone = model.backbone
    head, predictor = model.roi_heads.box_head, model.roi_heads.box_predictor
    pooler = model.roi_heads.box_roi_pool
    is_c4 = hasattr(head, "representation_size") and len(getattr(pooler, "featmap_names", [])) == 1
    if is_c4:
        wrapper = _Trunk(backbone, head, predictor)
    else:
        size = pooler.output_size if isinstance(pooler.output_size, (tuple, list)) else (pooler.output_size,) * 2
        wrapper = _FPNCost(backbone, head, predictor, (backbone.out_channels, *size))
    wrapper.train(model.training)    # count_flops restores the wrapper's mode: keep the model's
    params = count_params(wrapper, convention)   # backbone + head + predictor, each tensor once
    flops = count_flops(wrapper, input_size, convention=convention)
    return {"params": params, "flops": flops, "rpn_params": count_params(model.rpn, convention),
            "total_params": count_params(model, convention)}
