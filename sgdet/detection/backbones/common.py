"""Pieces shared by the backbone builders: loading the classification network a backbone is cut
from (a compressed sgdet checkpoint, a dense torchvision ``.pth`` or nothing), the C4 and FPN
wrappers, the pooled RoI head, and freezing (frozen stem/first stage and frozen BatchNorm, as
Faster R-CNN implementations train with batches of one or two images)."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ...checkpoint import peek
from ...errors import CheckpointError, ConfigError
from ...layers import is_sg_layer
from .registry import Backbone

_BN_TYPES = (nn.BatchNorm2d,)


def _skeleton(arch: dict) -> nn.Module | None:
    """The registered network ``arch`` names, allocated but not initialised (every tensor is
    overwritten by the checkpoint: random init of a ResNet50 would cost more than the load)."""
    from ...models import ARCHITECTURES, build
    if not arch or arch.get("name") not in ARCHITECTURES:
        return None
    with torch.device("meta"):
        model = build(arch["name"], **dict(arch.get("kwargs") or {}))
    return model.to_empty(device="cpu")


def load_classifier(arch: str, weights: str | os.PathLike | None, masked: bool,
                    family: type, deploy: bool = False) -> nn.Module:
    """The classification network a backbone is cut from.

    ``weights``: an sgdet checkpoint (``sgdet.save`` output: masked, dense or deployed; it may hold
    any network of ``family``, e.g. any torchvision ResNet), a dense state dict ``.pth`` (loaded
    with ``sgdet.load_dense_weights`` into ``arch``), or None (random init). ``masked``: the
    backbone is an SG one: a dense network gets full masks (``sgdet.convert``) so it can be
    compressed later; a dense backbone refuses a masked checkpoint (name the ``sg_`` backbone).
    ``deploy``: return the deployed (diverse group convolution) form, for inference."""
    from ... import checkpoint, models
    from ...compress import convert
    from ...deploy import deploy as deploy_model
    if weights is None:
        model = models.build(arch)
    else:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise CheckpointError(f"backbone weights not found: {path}")
        header = peek(path)          # None: read as a plain state dict
        arch_entry = None if header is None else (header.get("arch") or {})
        if arch_entry is not None:
            model = checkpoint.load(path, model=_skeleton(arch_entry))
            if not isinstance(model, family):
                raise ConfigError(f"{path} holds a {type(model).__name__}, not a {family.__name__} "
                                  f"that the {arch} backbone is cut from")
            if not masked and checkpoint.form_of(model) != "dense":
                raise ConfigError(f"{path} holds a compressed ({checkpoint.form_of(model)}) network; "
                                  f"use the backbone 'sg_{arch}'")
        else:
            model = models.load_dense_weights(models.build(arch), path)
    if masked and not any(is_sg_layer(m) for m in model.modules()) and checkpoint.form_of(model) == "dense":
        convert(model)
    if deploy and any(is_sg_layer(m) for m in model.modules()):
        model = deploy_model(model)
    return model


@torch.no_grad()
def feature_channels(*modules: nn.Module) -> list:
    """Output channels of each module of the chain ``modules`` (an int, or an OrderedDict per key
    for a dict output), from one small eval-mode forward pass: deployed layers may have gathered
    their inputs, so the structure alone does not tell."""
    x, channels = torch.zeros(1, 3, 32, 32), []   # stride 32 -> 1x1: shape only, cheap
    for module in modules:
        was_training = module.training
        module.eval()
        try:
            x = module(x)
        finally:
            module.train(was_training)
        if isinstance(x, dict):
            channels.append(OrderedDict((k, int(v.shape[1])) for k, v in x.items()))
        else:
            channels.append(int(x.shape[1]))
    return channels


def freeze(modules: Iterable[nn.Module]) -> None:
    """Stop training the parameters of ``modules`` (a frozen stem or stage)."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)


class _FrozenBN(nn.Module):
    """Mixin: with ``freeze_bn`` every BatchNorm stays in eval mode (running statistics of the
    classification network) and its affine parameters are not trained."""

    freeze_bn: bool = True

    def _freeze_bn(self, enabled: bool) -> None:
        self.freeze_bn = bool(enabled)
        if enabled:
            for m in self.modules():
                if isinstance(m, _BN_TYPES):
                    for p in m.parameters():
                        p.requires_grad_(False)
            self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, _BN_TYPES):
                    m.eval()
        return self


class PooledRoIHead(_FrozenBN):
    """The C4 box head: the classification network's last stage (ResNet ``layer4``, DenseNet
    ``transition3 + denseblock4 + norm5 + ReLU``) run on every pooled RoI, then global average
    pooling to a ``representation_size`` vector. Stands in for torchvision's TwoMLPHead."""

    def __init__(self, stage: nn.Module, representation_size: int, freeze_bn: bool = True) -> None:
        super().__init__()
        self.stage = stage
        self.representation_size = int(representation_size)
        self._freeze_bn(freeze_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stage(x), 1), 1)


class SingleFeatureBackbone(_FrozenBN, Backbone):
    """One feature map (the paper's C4 layout: stride 16), returned under the name ``'0'``, plus
    the RoI box head that continues the network."""

    def __init__(self, body: nn.Module, out_channels: int, stride: int,
                 box_head: nn.Module | None = None, freeze_bn: bool = True) -> None:
        super().__init__()
        self.body = body
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.box_head = box_head
        self._freeze_bn(freeze_bn)

    def output_shape(self) -> dict[str, tuple[int, int]]:
        return {"0": (self.out_channels, self.stride)}

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", self.body(images))])


class FPNBackbone(_FrozenBN, Backbone):
    """torchvision's FeaturePyramidNetwork over four stages (strides 4, 8, 16, 32) plus a max-pooled
    level (stride 64): maps ``'0'..'3'`` and ``'pool'`` of ``out_channels`` each, the layout
    torchvision's default Faster R-CNN anchors and RoI pooler expect."""

    def __init__(self, body: nn.Module, return_layers: dict[str, str], in_channels: Sequence[int],
                 out_channels: int = 256, freeze_bn: bool = True) -> None:
        super().__init__()
        self.fpn_body = BackboneWithFPN(body, return_layers, list(in_channels), out_channels,
                                        extra_blocks=LastLevelMaxPool())
        self.out_channels = int(out_channels)
        self.box_head = None
        self._freeze_bn(freeze_bn)

    def output_shape(self) -> dict[str, tuple[int, int]]:
        strides = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
        return {k: (self.out_channels, s) for k, s in strides.items()}

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn_body(images)


def check_freeze_at(freeze_at: int, stages: int) -> int:
    if not isinstance(freeze_at, int) or isinstance(freeze_at, bool) or not 0 <= freeze_at <= stages:
        raise ConfigError(f"freeze_at must be an integer in 0..{stages}, got {freeze_at!r}")
    return freeze_at
