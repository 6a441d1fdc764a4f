"""Deployment, fast stage, block fusion: where a block's convs all run on the native kernel with
their BatchNorms folded in, the block's ReLUs and its residual add run at the kernels' stores
too, so no separate pass over a feature map is left (torchvision's ResNet blocks and DenseNet
layers are built in; ``register_fused_block`` adds others).

A fused block keeps its class, submodules and state-dict keys: only its instance ``forward`` is
replaced by one that takes the fused path when every conv of it folds its BN on this call (eval
mode, no autograd, kernel built) and otherwise runs the class's own forward. ``relink`` restores
fold links and fused forwards after a checkpoint load."""
from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn

from .modules import DiverseGroupConv2d, FoldedBatchNorm2d, link_folded_norms

# {qualified class name or class: (the (conv, bn) pairs that must all be folded, fused forward)}
FUSED_BLOCKS: dict = {}


def register_fused_block(cls: type | str, folded: list[tuple[str, str]],
                         forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
    """Declare that blocks of ``cls`` whose (conv, bn) pairs ``folded`` are all folded may run
    ``forward(block, x)``, which calls the convs as ``conv(x, relu=..., residual=...)``."""
    FUSED_BLOCKS[cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"] = (folded, forward)


def _bottleneck(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block.conv1(x, relu=True)
    out = block.conv2(out, relu=True)
    identity = x if block.downsample is None else block.downsample(x)
    return block.conv3(out, relu=True, residual=identity)


def _basic_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block.conv1(x, relu=True)
    identity = x if block.downsample is None else block.downsample(x)
    return block.conv2(out, relu=True, residual=identity)


def _dense_layer(layer: nn.Module, x) -> torch.Tensor:
    features = torch.cat(x, 1) if isinstance(x, (list, tuple)) else x
    out = layer.conv1(layer.relu1(layer.norm1(features)), relu=True)     # norm2 + relu2 at the store
    return layer.conv2(out)              # eval mode: the layer's dropout is the identity


register_fused_block("torchvision.models.resnet.Bottleneck",
                     [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")], _bottleneck)
register_fused_block("torchvision.models.resnet.BasicBlock", [("conv1", "bn1"), ("conv2", "bn2")],
                     _basic_block)
register_fused_block("torchvision.models.densenet._DenseLayer", [("conv1", "norm2")], _dense_layer)


def _fused_forward(block: nn.Module, x, *args, **kwargs):
    folded, fused = block._sgdet_fusion
    if not args and not kwargs and all(getattr(block, c).folds(getattr(block, b)) for c, b in folded):
        return fused(block, x)
    return type(block).forward(block, x, *args, **kwargs)


def _foldable(block: nn.Module, folded) -> bool:
    for conv_name, bn_name in folded:
        conv, bn = getattr(block, conv_name, None), getattr(block, bn_name, None)
        if not (isinstance(conv, DiverseGroupConv2d) and isinstance(bn, FoldedBatchNorm2d) and bn._conv is conv):
            return False
    return True


def fuse_blocks(model: nn.Module) -> int:
    """Give every registered block whose BNs are all folded its fused forward; returns how many."""
    fused = 0
    for block in model.modules():
        cls = type(block)
        entry = FUSED_BLOCKS.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is None:
            continue
        if _foldable(block, entry[0]):
            block._sgdet_fusion = entry
            block.forward = types.MethodType(_fused_forward, block)
            fused += 1
        elif "forward" in block.__dict__:
            del block.forward                                 # no longer fusable: the class's own
    return fused


def relink(model: nn.Module) -> dict:
    """Re-establish folded BNs and fused blocks (after sgdet.load); returns the counts."""
    return {"folded_norms": link_folded_norms(model), "fused_blocks": fuse_blocks(model)}
