"""Deployment, exact stage: deploy() turns every masked SG layer of a model into its diverse
group form (sgdet.deploy.modules), gathering a BN with the SG conv it feeds where the block
pattern allows (sgdet.deploy.patterns), then optionally hands the result to the fast stage
(sgdet.deploy.optimize)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..layers import SGConv2d, is_sg_layer
from ..models import arch_of
from .modules import DiverseGroupConv2d, DiverseGroupLinear, GatheredBatchNorm2d
from .optimize import optimize as optimize_model
from .patterns import bn_conv_pairs


@torch.no_grad()
def deploy(model: nn.Module, inplace: bool = False, optimize: bool = False,
           example_input: torch.Tensor | None = None, repeats: int = 5,
           backend: str = "auto") -> nn.Module:
    """Convert every masked SG layer of ``model`` into its diverse group form.

    Returns a new model (``inplace=False``) whose outputs equal the masked model's and whose
    parameters are only the kept connections. The deployed model can be trained further, saved
    with sgdet.save and exported; it can no longer be regrouped.

    ``optimize=True`` then runs sgdet.deploy.optimize: permutations folded into neighbours, dead
    channels dropped, and each layer given its fastest exact execution plan, timed on
    ``example_input`` (on the model's device) where one is given, else from a cost model. A
    channels_last ``example_input`` turns the model channels_last first, so plans are timed in
    the layout the model will run in. The report is kept as ``deployed.sgdet_fast_report``.
    ``backend`` ("auto", "native" or "torch") says whether the native kernels of
    sgdet.deploy.native may run layers (see sgdet.deploy.optimize)."""
    arch = arch_of(model)
    deployed = model if inplace else copy.deepcopy(model)
    if arch is not None:
        deployed.sgdet_arch = arch
    in_maps: dict[str, torch.Tensor] = {}
    for bn_name, conv_name in bn_conv_pairs(deployed):
        conv = deployed.get_submodule(conv_name)
        used = conv.mask.any(0).cpu()
        if bool(used.all()):
            continue
        channels = torch.nonzero(used).flatten()
        remap = torch.full((conv.in_channels,), -1, dtype=torch.long)
        remap[channels] = torch.arange(channels.numel())
        in_maps[conv_name] = remap
        gathered = GatheredBatchNorm2d.from_bn(deployed.get_submodule(bn_name), channels)
        deployed.set_submodule(bn_name, gathered, strict=True)
    for name, layer in list(deployed.named_modules()):
        if not is_sg_layer(layer):
            continue
        in_map = in_maps.get(name)
        width = None if in_map is None else int((in_map >= 0).sum())
        cls = DiverseGroupConv2d if isinstance(layer, SGConv2d) else DiverseGroupLinear
        new = cls.from_sg(layer, in_map, width)
        new.train(layer.training)
        deployed.set_submodule(name, new, strict=True)
    if optimize:
        if (example_input is not None and example_input.dim() == 4 and not example_input.is_contiguous()
                and example_input.is_contiguous(memory_format=torch.channels_last)):
            deployed = deployed.to(memory_format=torch.channels_last)   # tune in the layout it will run in
        deployed.sgdet_fast_report = optimize_model(deployed, example_input, repeats=repeats,
                                                    backend=backend)
    return deployed
