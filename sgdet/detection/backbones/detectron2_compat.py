"""The SG backbones inside detectron2, for users who have it installed (the suite does not depend
on it; the tests that need it skip without it). ``tools/train_net_detectron2.py`` is the entry
point built on this module (``configs/detectron2/*.yaml``).

Importing this module registers, for every name ``N`` in :data:`sgdet.BACKBONE_REGISTRY`, a
detectron2 backbone builder ``build_N_backbone`` in detectron2's ``BACKBONE_REGISTRY`` (a
detectron2 ``Backbone`` subclass with a correct ``output_shape()``), and ``SGRes5ROIHeads`` in
its ``ROI_HEADS_REGISTRY``: the C4 RoI head whose per-RoI stage is the compressed network's last
stage (ResNet ``layer4``, DenseNet ``transition3 .. norm5``) with its masks, as in the paper.

    import sgdet.detection.backbones.detectron2_compat as sg_d2
    cfg = get_cfg(); sg_d2.add_sg_config(cfg)
    cfg.merge_from_file("configs/detectron2/faster_rcnn_sg_r50_c4.yaml")
    cfg.MODEL.SG.WEIGHTS = "resnet50_g_conv60_fc60.sg.pt"     # MODEL.WEIGHTS stays detectron2's

A C4 model reads its checkpoint once: the backbone builder hands the RoI head it cut from the same
network over to ``SGRes5ROIHeads`` (a one-entry hand-over keyed by backbone name, weights file
with its mtime and size, and freezing), instead of the head loading the file again.

``add_sg_config`` also adds ``DATASETS.ROOT`` and ``DATASETS.REGISTER`` (the suite's own keys:
``[[name, json_file, image_root], ...]``); ``register_config_datasets(cfg)`` registers those
entries with detectron2's ``register_coco_instances``.

Feature names: C4 backbones return ``res4`` (stride 16); FPN backbones ``p2 .. p6``. The
networks expect torchvision's input convention: RGB, ``MODEL.PIXEL_MEAN [123.675, 116.28,
103.53]``, ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]``, ``INPUT.FORMAT RGB``.
"""
from __future__ import annotations

import os

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

from ...errors import CheckpointError, ConfigError, DatasetError
from .registry import BACKBONE_REGISTRY, build_backbone

C4_NAMES = {"0": "res4"}
FPN_NAMES = {"0": "p2", "1": "p3", "2": "p4", "3": "p5", "pool": "p6"}


def add_sg_config(cfg) -> None:
    """Add ``MODEL.SG.WEIGHTS`` (the compressed classification checkpoint the SG backbone and
    head are cut from), ``MODEL.SG.FREEZE_BN``, ``DATASETS.ROOT`` and ``DATASETS.REGISTER`` to a
    detectron2 config (call it before ``merge_from_file`` of a configs/detectron2 yaml)."""
    cfg.MODEL.SG = D2CfgNode()
    cfg.MODEL.SG.WEIGHTS = ""
    cfg.MODEL.SG.FREEZE_BN = True
    cfg.DATASETS.ROOT = ""         # relative REGISTER paths resolve here ("": $SGDET_DATASETS)
    cfg.DATASETS.REGISTER = []     # your own COCO-format data: [[name, json_file, image_root], ...]


#: DATASETS.REGISTER names this module registered: name -> (json_file, image_root)
_REGISTERED: dict[str, tuple[str, str]] = {}


def register_config_datasets(cfg) -> list[str]:
    """Register the config's ``DATASETS.REGISTER`` entries in detectron2's catalogs
    (``register_coco_instances``; relative paths under ``DATASETS.ROOT`` or ``$SGDET_DATASETS``)
    and return their names. An entry registered before with the same files is kept; one of ours
    with other files is replaced; a name detectron2 already knows otherwise is a ConfigError."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from ..datasets import datasets_root
    base = datasets_root(str(cfg.DATASETS.get("ROOT", "")) or None)
    names = []
    for entry in cfg.DATASETS.get("REGISTER", []):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, str) for v in entry)):
            raise ConfigError(f"DATASETS.REGISTER entries are [name, json_file, image_root], got {entry!r}")
        name, json_file, image_root = entry[0], os.path.join(base, entry[1]), os.path.join(base, entry[2])
        if not os.path.isfile(json_file):
            raise DatasetError(f"DATASETS.REGISTER {name!r}: annotation file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise DatasetError(f"DATASETS.REGISTER {name!r}: image folder not found: {image_root}")
        if name in DatasetCatalog:
            if _REGISTERED.get(name) == (json_file, image_root):
                names.append(name)
                continue
            if name not in _REGISTERED:
                raise ConfigError(f"dataset {name!r} is already registered in detectron2; "
                                  "register yours under another name")
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
        _REGISTERED[name] = (json_file, image_root)
        names.append(name)
    return names


def check_sg_config(cfg) -> None:
    """One-line errors for what would otherwise fail deep inside detectron2: an unknown
    ``MODEL.BACKBONE.NAME``, a missing ``MODEL.SG.WEIGHTS`` file, a dataset name nobody
    registered (call after :func:`register_config_datasets`)."""
    from detectron2.data import DatasetCatalog
    if cfg.MODEL.BACKBONE.NAME not in D2_BACKBONE_REGISTRY:
        sg = sorted(n for n, _ in D2_BACKBONE_REGISTRY if n.startswith("build_") and
                    sg_name_of(n) in BACKBONE_REGISTRY)
        raise ConfigError(f"unknown MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r}; "
                          f"the sgdet ones: {', '.join(sg)}")
    weights = getattr(cfg.MODEL, "SG", None) and cfg.MODEL.SG.WEIGHTS
    if weights and not os.path.isfile(weights):
        raise CheckpointError(f"MODEL.SG.WEIGHTS not found: {weights}")
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in DatasetCatalog:
                raise ConfigError(f"DATASETS.{key} names {name!r}, which is not registered "
                                  "(add it to DATASETS.REGISTER as [name, json_file, image_root])")


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


#: The C4 RoI head cut with the last backbone built, waiting for SGRes5ROIHeads: at most one
#: entry, {hand-over key: head}. Taking it saves reading the checkpoint a second time.
_HANDOVER: dict[tuple, torch.nn.Module] = {}


def _handover_key(d2_name: str, cfg) -> tuple:
    kw = _sg_kwargs(cfg)
    stamp = None
    if kw["weights"] and os.path.isfile(kw["weights"]):
        st = os.stat(kw["weights"])
        stamp = (os.path.realpath(kw["weights"]), st.st_mtime_ns, st.st_size)
    return (d2_name, kw["weights"], stamp, kw["freeze_at"], kw["freeze_bn"])


def _make_builder(name: str):
    def builder(cfg, input_shape=None):
        inner = build_backbone(name, **_sg_kwargs(cfg))
        head = inner.take_box_head() if hasattr(inner, "take_box_head") else None
        _HANDOVER.clear()
        if head is not None:        # the C4 head, for SGRes5ROIHeads (built right after)
            _HANDOVER[_handover_key(f"build_{name}_backbone", cfg)] = head
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
        head = _HANDOVER.pop(_handover_key(cfg.MODEL.BACKBONE.NAME, cfg), None)
        if head is None:            # no backbone built just before: cut the head from the file
            inner = build_backbone(sg_name_of(cfg.MODEL.BACKBONE.NAME), **_sg_kwargs(cfg))
            head = inner.take_box_head() if hasattr(inner, "take_box_head") else None
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
