"""Params and FLOPs (multiply-accumulates, as in the paper) of dense, masked and deployed models.

Params count every parameter once, except that an SG layer's weight counts only its kept
connections. FLOPs count the MACs of convolutions and linear layers from one forward pass on a
dummy input; for a deployed model they agree with torch.utils.flop_counter.FlopCounterMode / 2.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import SGConv2d, SGLinear, is_sg_layer


def _layer_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    custom = getattr(module, "sg_macs", None)
    if callable(custom):                      # deployed layers know their own cost
        return int(custom(inputs[0], output))
    if isinstance(module, SGConv2d):
        return int(output[0, 0].numel()) * output.shape[0] * module.kept_connections()
    if isinstance(module, nn.Conv2d):
        per_position = module.weight.numel()   # C_out * C_in/groups * k * k
        return int(output[0, 0].numel()) * output.shape[0] * per_position
    if isinstance(module, SGLinear):
        return int(output.numel() // module.out_features) * module.kept_connections()
    if isinstance(module, nn.Linear):
        return int(output.numel() // module.out_features) * module.weight.numel()
    return 0


def count_params(model: nn.Module) -> int:
    sg_weights = {id(m.weight): m.kept_connections() for m in model.modules() if is_sg_layer(m)}
    total = 0
    for p in model.parameters():              # parameters() yields each shared tensor once
        total += sg_weights.get(id(p), p.numel())
    return total


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 224, 224),
                example: torch.Tensor | None = None) -> int:
    """MACs of one forward pass on a single example of shape ``input_size`` (no batch dim)."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = example if example is not None else torch.zeros(1, *input_size, device=device)
    total = [0]

    def hook(module, inputs, output):
        total[0] += _layer_macs(module, inputs, output)

    leaf_types = (nn.Conv2d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, leaf_types) or callable(getattr(m, "sg_macs", None))]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0] // x.shape[0]


def count(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> dict[str, int]:
    """{'params': ..., 'flops': ...} with flops as multiply-accumulates for one example."""
    return {"params": count_params(model), "flops": count_flops(model, input_size)}


_SCALES = {"G": 1e9, "M": 1e6, "K": 1e3}


def format_count(value: float, unit: str | None = None) -> str:
    """Paper-style magnitude: 431K, 11.88M, 1.91G; ``unit`` forces K, M or G (LeNet: K)."""
    if unit is None:
        unit = next((u for u, scale in _SCALES.items() if abs(value) >= scale), "")
    if not unit:
        return f"{value:.0f}"
    digits = 0 if unit == "K" else 2
    return f"{value / _SCALES[unit]:.{digits}f}{unit}"
