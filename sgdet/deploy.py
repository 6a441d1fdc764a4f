"""Exact deployment (section 3.6, Eq. 17): every masked SG layer becomes a diverse group
convolution. Filters are permuted so each group is contiguous (Q), the input channels each group
reads are gathered (P: reused channels duplicated, ignored ones dropped), and each group is a
dense convolution over its own channels. Outputs equal the masked model's to float32 rounding.

Where a BatchNorm feeds an SG convolution directly (DenseNet's pre-activation layers), the BN is
gathered too, so channels no group reads are dropped before normalisation."""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SGConv2d, SGLinear, is_sg_layer


def _group_layout(layer: nn.Module, in_map: torch.Tensor | None):
    """Permutation and per-group input indices of an SG layer.

    Returns (order, out_order, in_index, group_out, group_in): ``order`` lists filters group by
    group, ``out_order`` restores the original channel order, ``in_index`` concatenates the
    input channels of each group (remapped through ``in_map`` when the input was gathered)."""
    group, keep = layer.group.cpu(), layer.group_keep().cpu()
    order = torch.argsort(group, stable=True)
    out_order = torch.argsort(order)
    group_out = torch.bincount(group, minlength=keep.shape[0]).tolist()
    per_group = [torch.nonzero(row).flatten() for row in keep]
    in_index = torch.cat(per_group) if per_group else torch.zeros(0, dtype=torch.long)
    if in_map is not None:
        in_index = in_map[in_index]
    return order, out_order, in_index, group_out, [int(p.numel()) for p in per_group], per_group


class _DiverseGroup(nn.Module):
    """Shared state of deployed layers: the gather index, group sizes and the output order."""

    def _init_groups(self, out_features: int, group_out: list[int], group_in: list[int],
                     kernel: tuple[int, ...], bias: bool, source_in: int) -> None:
        self.source_in = int(source_in)   # input width of the dense layer this one came from
        self.group_out = [int(v) for v in group_out]
        self.group_in = [int(v) for v in group_in]
        self.out_features_total = out_features
        self.register_buffer("in_index", torch.zeros(sum(self.group_in), dtype=torch.long))
        self.register_buffer("out_order", torch.arange(out_features, dtype=torch.long))
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(o, i, *kernel)) for o, i in zip(self.group_out, self.group_in)])
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _fill(self, layer: nn.Module, in_map: torch.Tensor | None) -> None:
        order, out_order, in_index, _, _, per_group = _group_layout(layer, in_map)
        weight = layer.masked_weight().detach()
        with torch.no_grad():
            self.in_index.copy_(in_index)
            self.out_order.copy_(out_order)
            start = 0
            for param, size, channels in zip(self.weights, self.group_out, per_group):
                filters = order[start:start + size]
                param.copy_(weight[filters][:, channels])
                start += size
            if self.bias is not None:
                self.bias.copy_(layer.bias.detach()[order])

    def _bias_slice(self, start: int, size: int):
        return None if self.bias is None else self.bias[start:start + size]

    def structure(self) -> dict:
        return {"group_out": self.group_out, "group_in": self.group_in,
                "bias": self.bias is not None, "source_in": self.source_in}

    def pruned_fraction(self) -> float:
        kept = sum(o * i for o, i in zip(self.group_out, self.group_in))
        return 1.0 - kept / (self.out_features_total * self.source_in)


class DiverseGroupConv2d(_DiverseGroup):
    """A diverse group convolution: groups of unequal size, each over its own input channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, group_out=(), group_in=(), bias: bool = True,
                 source_in: int | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        pair = nn.modules.utils._pair
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self._init_groups(out_channels, list(group_out), list(group_in), self.kernel_size, bias,
                          source_in or in_channels)

    @classmethod
    def from_sg(cls, layer: SGConv2d, in_map: torch.Tensor | None = None,
                in_channels: int | None = None) -> "DiverseGroupConv2d":
        _, _, _, group_out, group_in, _ = _group_layout(layer, in_map)
        new = cls(in_channels or layer.in_channels, layer.out_channels, layer.kernel_size,
                  layer.stride, layer.padding, layer.dilation, group_out, group_in,
                  layer.bias is not None, layer.in_channels).to(layer.weight.device, layer.weight.dtype)
        new._fill(layer, in_map)
        return new

    def structure(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), **super().structure()}

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.padding == "same":
            return height, width
        padding = (0, 0) if self.padding == "valid" else self.padding
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                     zip((height, width), padding, self.dilation, self.kernel_size, self.stride))

    def _empty_output(self, x: torch.Tensor, size: int) -> torch.Tensor:
        # a group that kept no input channel emits its bias only: no arithmetic is spent on it
        return x.new_zeros(x.shape[0], size, *self._output_size(*x.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = x.index_select(1, self.in_index)
        outputs, start_in, start_out = [], 0, 0
        for weight, size_out, size_in in zip(self.weights, self.group_out, self.group_in):
            bias = self._bias_slice(start_out, size_out)
            if size_in == 0:
                y = self._empty_output(x, size_out)
                y = y if bias is None else y + bias.view(1, -1, 1, 1)
            else:
                y = F.conv2d(gathered[:, start_in:start_in + size_in], weight, bias,
                             self.stride, self.padding, self.dilation)
            outputs.append(y)
            start_in += size_in
            start_out += size_out
        return torch.cat(outputs, 1).index_select(1, self.out_order)

    def sg_macs(self, x: torch.Tensor, output: torch.Tensor) -> int:
        spatial = output.shape[0] * output[0, 0].numel()
        return spatial * sum(w.numel() for w in self.weights)


class DiverseGroupLinear(_DiverseGroup):
    """The fully-connected form (Eq. 4 with diverse groups)."""

    def __init__(self, in_features: int, out_features: int, group_out=(), group_in=(),
                 bias: bool = True, source_in: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_groups(out_features, list(group_out), list(group_in), (), bias,
                          source_in or in_features)

    @classmethod
    def from_sg(cls, layer: SGLinear, in_map: torch.Tensor | None = None,
                in_channels: int | None = None) -> "DiverseGroupLinear":
        _, _, _, group_out, group_in, _ = _group_layout(layer, in_map)
        new = cls(in_channels or layer.in_features, layer.out_features, group_out, group_in,
                  layer.bias is not None, layer.in_features).to(layer.weight.device, layer.weight.dtype)
        new._fill(layer, in_map)
        return new

    def structure(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                **super().structure()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = x.index_select(-1, self.in_index)
        outputs, start_in, start_out = [], 0, 0
        for weight, size_out, size_in in zip(self.weights, self.group_out, self.group_in):
            bias = self._bias_slice(start_out, size_out)
            if size_in == 0:
                y = x.new_zeros(*x.shape[:-1], size_out)
                y = y if bias is None else y + bias
            else:
                y = F.linear(gathered[..., start_in:start_in + size_in], weight, bias)
            outputs.append(y)
            start_in += size_in
            start_out += size_out
        return torch.cat(outputs, -1).index_select(-1, self.out_order)

    def sg_macs(self, x: torch.Tensor, output: torch.Tensor) -> int:
        return (output.numel() // self.out_features) * sum(w.numel() for w in self.weights)


class GatheredBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d over a subset of its input's channels: selects them, then normalises them.
    Used where a BN feeds an SG conv directly and some channels are read by no group."""

    def __init__(self, in_channels: int, num_features: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.in_channels = in_channels
        self.register_buffer("channel_index", torch.arange(num_features, dtype=torch.long))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, channels: torch.Tensor) -> "GatheredBatchNorm2d":
        reference = next(iter(bn.parameters()), None)
        if reference is None:
            reference = bn.running_mean
        new = cls(bn.num_features, int(channels.numel()), bn.eps, bn.momentum, bn.affine,
                  bn.track_running_stats)
        if reference is not None:
            new = new.to(device=reference.device, dtype=reference.dtype)   # int buffers stay int
        new.train(bn.training)
        idx = channels.to(new.channel_index.device)
        with torch.no_grad():
            new.channel_index.copy_(idx)
            if bn.affine:
                new.weight.copy_(bn.weight[idx])
                new.bias.copy_(bn.bias[idx])
            if bn.track_running_stats:
                new.running_mean.copy_(bn.running_mean[idx])
                new.running_var.copy_(bn.running_var[idx])
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        return new

    def structure(self) -> dict:
        return {"in_channels": self.in_channels, "num_features": self.num_features,
                "eps": self.eps, "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(1, self.channel_index))


# Modules whose forward applies BN (then an element-wise activation) straight into a conv:
# {module class: [(bn attribute, conv attribute), ...]}. nn.Sequential is handled generically.
BN_CONV_PAIRS: dict[type, list[tuple[str, str]]] = {}


def register_bn_conv_pairs(cls: type, pairs: Iterable[tuple[str, str]]) -> None:
    """Declare that in ``cls.forward`` BN attribute a feeds conv attribute b through element-wise
    ops only, and nothing else reads a's output; deploy() may then gather the BN too."""
    BN_CONV_PAIRS[cls] = list(pairs)


def _register_torchvision_pairs() -> None:
    from torchvision.models import densenet
    register_bn_conv_pairs(densenet._DenseLayer, [("norm1", "conv1"), ("norm2", "conv2")])


_register_torchvision_pairs()

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Identity,
                nn.Dropout)


def _sequential_pairs(seq: nn.Sequential) -> list[tuple[str, str]]:
    names, mods = list(seq._modules.keys()), list(seq._modules.values())
    pairs = []
    for i, m in enumerate(mods):
        if type(m) is not nn.BatchNorm2d:
            continue
        j = i + 1
        while j < len(mods) and isinstance(mods[j], _ELEMENTWISE):
            j += 1
        if j < len(mods) and isinstance(mods[j], SGConv2d):
            pairs.append((names[i], names[j]))
    return pairs


def _bn_conv_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Fully-qualified (bn, conv) names where the BN may be gathered with the conv."""
    found = []
    for prefix, module in model.named_modules():
        pairs = BN_CONV_PAIRS.get(type(module))
        if pairs is None and isinstance(module, nn.Sequential):
            pairs = _sequential_pairs(module)
        for bn_name, conv_name in pairs or ():
            bn, conv = getattr(module, bn_name, None), getattr(module, conv_name, None)
            if (type(bn) is nn.BatchNorm2d and isinstance(conv, SGConv2d)
                    and bn.num_features == conv.in_channels):
                join = (prefix + ".") if prefix else ""
                found.append((join + bn_name, join + conv_name))
    return found


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Convert every masked SG layer of ``model`` into its diverse group form.

    Returns a new model (``inplace=False``) whose outputs equal the masked model's and whose
    parameters are only the kept connections. The deployed model can be trained further, saved
    with sgdet.save and exported; it can no longer be regrouped."""
    from .models import arch_of
    arch = arch_of(model)
    deployed = model if inplace else copy.deepcopy(model)
    if arch is not None:
        deployed.sgdet_arch = arch
    in_maps: dict[str, torch.Tensor] = {}
    for bn_name, conv_name in _bn_conv_pairs(deployed):
        conv = deployed.get_submodule(conv_name)
        used = conv.mask.any(0).cpu()
        if bool(used.all()):
            continue
        channels = torch.nonzero(used).flatten()
        remap = torch.full((conv.in_channels,), -1, dtype=torch.long)
        remap[channels] = torch.arange(channels.numel())
        in_maps[conv_name] = remap
        _set(deployed, bn_name, GatheredBatchNorm2d.from_bn(deployed.get_submodule(bn_name), channels))
    for name, layer in list(deployed.named_modules()):
        if not is_sg_layer(layer):
            continue
        in_map = in_maps.get(name)
        width = None if in_map is None else int((in_map >= 0).sum())
        cls: Callable = DiverseGroupConv2d if isinstance(layer, SGConv2d) else DiverseGroupLinear
        new = cls.from_sg(layer, in_map, width)
        new.train(layer.training)
        _set(deployed, name, new)
    return deployed


DEPLOYED_TYPES = (DiverseGroupConv2d, DiverseGroupLinear, GatheredBatchNorm2d)
