"""The SG backbones inside detectron2, for users who have it installed (it cannot be installed
where this suite is developed, so this module is exercised only by tests that skip without it).

Importing this module registers, for every name ``N`` in :data:`sgdet.BACKBONE_REGISTRY`, a
detectron2 backbone builder ``build_N_backbone`` in detectron2's ``BACKBONE_REGISTRY`` (a
detectron2 ``Backbone`` subclass with a correct ``output_shape()``), and ``SGRes5ROIHeads`` in
its ``ROI_HEADS_REGISTRY``: the C4 RoI head whose per-RoI stage is the compressed network's last
stage (ResNet ``layer4``, DenseNet ``transition3 .. norm5``) with its masks, as in the paper.

    import sgdet.detection.backbones.detectron2_compat as sg_d2
    cfg = get_cfg(); sg_d2.add_sg_config(cfg)
    cfg.merge_from_file("configs/detectron2/faster_rcnn_sg_r50_c4.yaml")
    cfg.MODEL.SG.WEIGHTS = "resnet50_g_conv60_fc60.sg.pt"     # MODEL.WEIGHTS stays detectron2's

Feature names: C4 backbones return ``res4`` (stride 16); FPN backbones ``p2 .. p6``. The
networks expect torchvision's input convention: RGB, ``MODEL.PIXEL_MEAN [123.675, 116.28,
103.53]``, ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]``, ``INPUT.FORMAT RGB``.
"""
from __future__ import annotations

try:
    from detectron2.config import CfgNode as D2CfgNode
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY as D2_BACKBONE_REGISTRY
    from detectron2.modeling import ROI_HEADS_REGISTRY, Backbone as D2Backbone
    from detectron2.modeling.roi_heads import Res5ROIHeads
except ImportError as exc:          # pragma: no cover - exercised where detectron2 is absent
    raise ImportError("sgdet.detection.backbones.detectron2_compat needs detectron2 installed "
                      f"({exc}); without it use tools/train_net.py (torchvision's Faster R-CNN)") from None

import torch

from .registry import BACKBONE_REGISTRY, build_backbone

C4_NAMES = {"0": "res4"}
FPN_NAMES = {"0": "p2", "1": "p3", "2": "p4", "3": "p5", "pool": "p6"}


def add_sg_config(cfg) -> None:
    """Add ``MODEL.SG.WEIGHTS`` (the compressed classification checkpoint the SG backbone and
    head are cut from) and ``MODEL.SG.FREEZE_BN`` to a detectron2 config."""
    cfg.MODEL.SG = D2CfgNode()
    cfg.MODEL.SG.WEIGHTS = ""
    cfg.MODEL.SG.FREEZE_BN = True


def _sg_kwargs(cfg) -> dict:
    sg = getattr(cfg.MODEL, "SG", None)
    return {"weights": (sg.WEIGHTS or None) if sg is not None else None,
            "freeze_at": int(cfg.MODEL.BACKBONE.FREEZE_AT),
            "freeze_bn": bool(sg.FREEZE_BN) if sg is not None else True}


class SGBackbone(D2Backbone):
    """An sgdet backbone behind detectron2's ``Backbone`` contract (renamed feature maps,
    ``output_shape()`` of ShapeSpecs, ``size_divisibility`` 32 for FPN)."""

    def __init__(self, inner, names: dict[str, str]) -> None:
        super().__init__()
        self.inner = inner
        self._names = dict(names)
        shapes = inner.output_shape()
        self._out_features = [names[k] for k in shapes]
        self._out_feature_channels = {names[k]: int(c) for k, (c, _) in shapes.items()}
        self._out_feature_strides = {names[k]: int(s) for k, (_, s) in shapes.items()}
        self._size_divisibility = 32 if len(shapes) > 1 else 0

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x):
        return {self._names[k]: v for k, v in self.inner(x).items()}

    def output_shape(self):
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name]) for name in self._out_features}


def _make_builder(name: str):
    def builder(cfg, input_shape=None):
        inner = build_backbone(name, **_sg_kwargs(cfg))
        head = inner.take_box_head() if hasattr(inner, "take_box_head") else None
        del head                    # the C4 head is rebuilt by SGRes5ROIHeads
        names = C4_NAMES if list(inner.output_shape()) == ["0"] else FPN_NAMES
        return SGBackbone(inner, names)
    builder.__name__ = f"build_{name}_backbone"
    builder.__doc__ = f"detectron2 builder of the sgdet backbone {name!r} (weights: cfg.MODEL.SG.WEIGHTS)."
    return builder


def sg_name_of(d2_name: str) -> str:
    """``build_sg_resnet50_backbone`` -> ``sg_resnet50``."""
    if d2_name.startswith("build_") and d2_name.endswith("_backbone"):
        return d2_name[len("build_"):-len("_backbone")]
    return d2_name


@ROI_HEADS_REGISTRY.register()
class SGRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads whose per-RoI stage is the compressed network's last stage (with its SG
    masks), taken from the same checkpoint as the backbone named by MODEL.BACKBONE.NAME."""

    @classmethod
    def _build_res5_block(cls, cfg):
        inner = build_backbone(sg_name_of(cfg.MODEL.BACKBONE.NAME), **_sg_kwargs(cfg))
        head = inner.take_box_head()
        if head is None:
            raise ValueError(f"{cfg.MODEL.BACKBONE.NAME} is not a C4 backbone; use StandardROIHeads")
        return _HeadStage(head), head.representation_size


class _HeadStage(torch.nn.Module):
    """The head's stage without its pooling (Res5ROIHeads averages itself); holding the head as a
    child keeps its frozen-BatchNorm behaviour through ``train()``."""

    def __init__(self, head) -> None:
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.stage(x)


for _name, _ in list(BACKBONE_REGISTRY):
    if f"build_{_name}_backbone" not in D2_BACKBONE_REGISTRY:
        D2_BACKBONE_REGISTRY.register(_make_builder(_name))
