"""The detection-backbone registry and the small contract every backbone meets.

A backbone is an ``nn.Module`` whose forward takes a batch of images ``[N, 3, H, W]`` and returns
an ``OrderedDict`` of feature maps, as torchvision's detection models expect; it carries
``out_channels`` (the channels every returned map has, which torchvision's RPN and RoI pooler read)
and ``output_shape()`` ({feature name: (channels, stride)}). A backbone in the paper's C4 layout
also carries ``box_head``: the last stage of the classification network, run on each pooled RoI
(see :class:`sgdet.detection.backbones.common.PooledRoIHead`); FPN backbones have ``box_head = None`` and
use torchvision's standard two-layer MLP head.

Registering your own backbone (the function's name is its registry name); with a ``box_head``
(a module with ``representation_size``) it is used as the C4 RoI head, without one torchvision's
TwoMLPHead runs on the RoIAligned maps::

    import torch, sgdet
    from sgdet.detection.backbones import BACKBONE_REGISTRY, SingleFeatureBackbone, build_backbone

    @BACKBONE_REGISTRY.register()
    def my_tiny_backbone(weights=None, **kwargs):
        body = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, stride=16, padding=1), torch.nn.ReLU())
        return SingleFeatureBackbone(body, out_channels=64, stride=16)

    backbone = build_backbone("my_tiny_backbone")
    detector = sgdet.build_faster_rcnn("my_tiny_backbone", num_classes=3, roi_size=7)
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from fvcore.common.registry import Registry
from torch import nn

from ...errors import ConfigError

BACKBONE_REGISTRY = Registry("SG_BACKBONE")
BACKBONE_REGISTRY.__doc__ = """Registry of detection backbones: ``fn(weights=None, **kwargs) -> Backbone``,
registered under the function's ``__name__`` with ``@BACKBONE_REGISTRY.register()``."""


class Backbone(nn.Module):
    """Contract of a detection backbone: ``forward(images) -> OrderedDict[str, Tensor]``,
    ``out_channels`` and ``output_shape()``. ``box_head`` is the RoI head module of a C4-layout
    backbone, else None."""

    out_channels: int
    box_head: nn.Module | None     # set by subclasses (a class default would hide the submodule)

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """{feature name: (channels, stride)} of the maps forward returns."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":  # pragma: no cover
        raise NotImplementedError

    def take_box_head(self) -> nn.Module | None:
        """Detach and return the RoI box head, so that a detector holds it once (in its RoI heads,
        not also inside the backbone)."""
        head = getattr(self, "box_head", None)
        if head is not None:
            del self.box_head            # unregister the submodule
            self.box_head = None
        return head


def registered_backbones() -> list[str]:
    """Sorted names of every registered backbone."""
    return sorted(name for name, _ in BACKBONE_REGISTRY)


def build_backbone(name: str, weights: str | None = None, **kwargs) -> Backbone:
    """Build the registered backbone ``name``; ``weights`` is an sgdet checkpoint of the
    classification network (masked, dense or deployed), a dense torchvision ``.pth``, or None for
    random initialisation. An unknown name is a ConfigError listing the registered ones."""
    if name not in BACKBONE_REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; registered backbones: "
                          f"{', '.join(registered_backbones())}")
    backbone = BACKBONE_REGISTRY.get(name)(weights=weights, **kwargs)
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "out_channels"):
        raise ConfigError(f"backbone builder {name!r} returned {type(backbone).__name__}, "
                          "not a module with out_channels")
    return backbone
