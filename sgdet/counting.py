"""Params and FLOPs (multiply-accumulates, as in the paper) of dense, masked and deployed models.

Two conventions, one counter (``count(..., convention=...)``):
- ``"sgdet"`` (the default): params count every parameter once (BatchNorm included), except that
  an SG layer's weight counts only its kept connections. FLOPs count the MACs of convolutions and
  linear layers from one forward pass on a dummy input; for a deployed model they are what its
  execution plan runs and agree with torch.utils.flop_counter.FlopCounterMode / 2.
- ``"paper"``: the authors' counter (``sgdet/counting_paper.py`` says its rules): 2 params per
  live output channel of a masked conv instead of the real BatchNorms, no masked-layer biases.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .layers import SGConv2d, SGLinear, is_sg_layer

#: the known counting conventions, the default first
CONVENTIONS: tuple[str, ...] = ("sgdet", "paper")


def check_convention(convention: str) -> str:
    """``convention`` if known, else a one-line ConfigError (a ValueError) naming the known ones."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown counting convention {convention!r}; "
                          f"choose from: {', '.join(CONVENTIONS)}")
    return convention


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


def count_params(model: nn.Module, convention: str = "sgdet") -> int:
    if check_convention(convention) == "paper":
        from .counting_paper import paper_params
        return paper_params(model)
    sg_weights = {id(m.weight): m.kept_connections() for m in model.modules() if is_sg_layer(m)}
    total = 0
    for p in model.parameters():              # parameters() yields each shared tensor once
        total += sg_weights.get(id(p), p.numel())
    return total


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 224, 224),
                example: torch.Tensor | None = None, convention: str = "sgdet") -> int:
    """MACs of one forward pass on a single example of shape ``input_size`` (no batch dim)."""
    layer_macs = _layer_macs
    if check_convention(convention) == "paper":
        from .counting_paper import paper_layer_macs as layer_macs
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = example if example is not None else torch.zeros(1, *input_size, device=device)
    total = [0]

    def hook(module, inputs, output):
        total[0] += layer_macs(module, inputs, output)

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


def count(model: nn.Module, input_size: Sequence[int] = (3, 224, 224),
          convention: str = "sgdet") -> dict[str, int]:
    """{'params': ..., 'flops': ...} with flops as multiply-accumulates for one example, counted
    by ``convention``: "sgdet" (default: every parameter, BatchNorm included) or "paper" (the
    authors' counter: torchvision DenseNet201 is their 19.82M / 4.29G)."""
    check_convention(convention)
    return {"params": count_params(model, convention),
            "flops": count_flops(model, input_size, convention=convention)}


_SCALES = {"G": 1e9, "M": 1e6, "K": 1e3}


def format_count(value: float, unit: str | None = None) -> str:
    """Paper-style magnitude: 431K, 11.88M, 1.91G; ``unit`` forces K, M or G (LeNet: K)."""
    if unit is None:
        unit = next((u for u, scale in _SCALES.items() if abs(value) >= scale), "")
    if not unit:
        return f"{value:.0f}"
    digits = 0 if unit == "K" else 2
    return f"{value / _SCALES[unit]:.{digits}f}{unit}"
