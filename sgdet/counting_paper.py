"""Counting, the paper's convention (``sgdet.count(model, size, convention="paper")``): params and
FLOPs as the authors' counter (their torchsummary fork in the code release) reports them.

- A masked conv (SGConv2d, or the DiverseGroupConv2d deployed from it) counts its surviving
  mask entries times k*k, plus 2 per output channel that still has a connection (standing in for
  its BatchNorm); its bias is not counted.
- A masked FC layer (SGLinear, DiverseGroupLinear) counts its surviving weights only, no bias.
- Real BatchNorm layers (every ``_BatchNorm``: gathered and folded ones included) count nothing.
- A layer left dense (the first conv, ResNet ``downsample`` convs) counts its weight and bias.
- A dense model (no masked or deployed layer: the baseline) is counted as its masked form with
  nothing pruned: the layers ``sgdet.compress`` would convert (default layer choice) count as
  above with every connection kept, the rest dense. So torchvision's DenseNet201 is 19.82M and
  ResNet50 25.55M, the paper's baselines (the LeNet-5 rows fix the FC rule: no bias).
- Any other parameter counts once.
- FLOPs are the multiply-accumulates of conv and FC layers only, from the kept connections
  (a deployed layer counts its per-group weights, not what its execution plan runs), so a model
  deployed by ``sgdet.deploy`` counts exactly as the masked model it came from.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .compress import compressible_layers
from .counting import _layer_macs
from .deploy.modules import DiverseGroupConv2d, DiverseGroupLinear
from .layers import SGConv2d, SGLinear, is_sg_layer

#: params per live output channel of a masked conv that stand in for its BatchNorm
BN_PER_CHANNEL = 2

_MASKED_TYPES = (SGConv2d, SGLinear, DiverseGroupConv2d, DiverseGroupLinear)


def _deployed_kept(module: nn.Module) -> int:
    return sum(int(w.numel()) for w in module.weights)


def _masked_params(module: nn.Module) -> int:
    """Paper params of one masked or deployed layer."""
    if is_sg_layer(module):
        kept = module.kept_connections()
        live = int(module.mask.any(dim=1).sum()) if isinstance(module, SGConv2d) else 0
    else:
        kept = _deployed_kept(module)
        live = (sum(o for o, i in zip(module.group_out, module.group_in) if i > 0)
                if isinstance(module, DiverseGroupConv2d) else 0)
    return kept + BN_PER_CHANNEL * live


def _baseline_params(module: nn.Module) -> int:
    """Paper params of a dense layer the compression would convert, nothing pruned."""
    live = module.out_channels if isinstance(module, nn.Conv2d) else 0
    return int(module.weight.numel()) + BN_PER_CHANNEL * live


def is_baseline(model: nn.Module) -> bool:
    """True for a model without masked or deployed layers (counted as its unpruned masked form)."""
    return not any(isinstance(m, _MASKED_TYPES) for m in model.modules())


def paper_params(model: nn.Module) -> int:
    would_mask = ({id(m) for _, m in compressible_layers(model)} if is_baseline(model) else set())
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        masked = isinstance(module, _MASKED_TYPES)
        own = list(module.parameters(recurse=masked))   # a deployed layer's weights sit in a ParameterList
        if masked:
            total += _masked_params(module)
        elif id(module) in would_mask:
            total += _baseline_params(module)
        elif not isinstance(module, _BatchNorm):
            total += sum(p.numel() for p in own if id(p) not in seen)
        seen.update(id(p) for p in own)
    return total


def paper_layer_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """MACs of one conv or FC call under the paper's convention: a deployed layer counts its
    per-group weights, not what its plan runs; any other layer as ``sgdet.counting`` counts it."""
    if isinstance(module, DiverseGroupConv2d):
        return int(output[0, 0].numel()) * output.shape[0] * _deployed_kept(module)
    if isinstance(module, DiverseGroupLinear):
        return int(output.numel() // module.out_features) * _deployed_kept(module)
    return _layer_macs(module, inputs, output)
