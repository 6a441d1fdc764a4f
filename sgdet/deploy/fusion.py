"""Deployment, fast stage, block fusion: where a block's convs all run on the native kernel with
their BatchNorms folded in, the block's ReLUs and its residual add run at the kernels' stores
too, so no separate pass over a feature map is left (torchvision's ResNet blocks and DenseNet
layers are built in; ``register_fused_block`` adds others). A fused DenseNet layer also runs its
cat + norm1 + ReLU in one native pass (``sgdet::norm_relu_gather``).

A fused block keeps its class, submodules and state-dict keys: only its instance ``forward`` is
replaced by one that takes the fused path when every conv of it folds its BN on this call (eval
mode, no autograd, kernel built) and otherwise runs the class's own forward. ``relink`` restores
fold links and fused forwards after a checkpoint load."""
from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn

from . import native
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


def _norm_operands(bn: nn.Module) -> tuple | None:
    """(index, scale, shift) that apply an eval-mode BN (gathered or plain) as
    ``x[:, index] * scale + shift``, cached until its tensors change; None where it normalises
    with batch statistics."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()   # fake tensors: no cache
    key = None
    if not tracing:
        tensors = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        key = tuple((t.data_ptr(), t._version) for t in tensors if t is not None)
        cached = getattr(bn, "_sgdet_norm_operands", None)
        if cached is not None and cached[0] == key:
            return cached[1]
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    index = getattr(bn, "channel_index", None)
    if index is None:
        index = torch.arange(bn.num_features, device=scale.device)
    operands = (index.contiguous(), scale.float().contiguous(), shift.float().contiguous())
    if not tracing:
        bn._sgdet_norm_operands = (key, operands)
    return operands


def _dense_layer(layer: nn.Module, x) -> torch.Tensor:
    features = list(x) if isinstance(x, (list, tuple)) else [x]
    operands = None
    if native.has_norm_relu_gather() and features[0].device.type == "cpu" and isinstance(layer.relu1, nn.ReLU):
        operands = _norm_operands(layer.norm1)
    if operands is not None:          # cat + norm1 + relu1 in one pass (native/norm_gather.cpp)
        normed = native.norm_relu_gather(features, *operands)
    else:
        normed = layer.relu1(layer.norm1(torch.cat(features, 1)))
    out = layer.conv1(normed, relu=True)     # norm2 + relu2 at the store
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
