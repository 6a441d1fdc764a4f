"""Masked self-grouping layers: SGConv2d and SGLinear.

Each layer keeps the dense weight of the layer it replaces plus two buffers:
``group`` (LongTensor [C_out], the filter's group) and ``mask`` (BoolTensor [C_out, C_in], the
input channels a filter keeps). The forward pass multiplies the weight by the mask, so pruned
connections contribute nothing and receive zero gradient. Invariant: filters of one group have
identical mask rows; ``set_structure`` is the only way the pruning code changes them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SelfGrouping:
    """Shared buffers and helpers of the masked layers (a mixin over nn.Conv2d / nn.Linear)."""

    group: torch.Tensor
    mask: torch.Tensor
    weight: nn.Parameter

    def _init_structure(self, out_features: int, in_features: int) -> None:
        device = self.weight.device
        self.register_buffer("group", torch.zeros(out_features, dtype=torch.long, device=device))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))

    @property
    def kernel_numel(self) -> int:
        return self.weight[0, 0].numel()

    @property
    def num_groups(self) -> int:
        return int(self.group.max().item()) + 1 if self.group.numel() else 0

    def weight_mask(self) -> torch.Tensor:
        """The boolean mask broadcastable to the weight's shape."""
        return self.mask.view(self.mask.shape + (1,) * (self.weight.dim() - 2))

    def masked_weight(self) -> torch.Tensor:
        # where(), not a product: a non-finite value in a pruned slot must not become NaN
        return torch.where(self.weight_mask(), self.weight, 0.0)

    @torch.no_grad()
    def zero_pruned_(self) -> None:
        """Set pruned weights to exactly zero (after an optimiser step or a regrouping)."""
        self.weight.masked_fill_(~self.weight_mask(), 0.0)

    def kept_connections(self) -> int:
        """Connections left (mask entries times the kernel size): the layer's pruned params."""
        return int(self.mask.sum().item()) * self.kernel_numel

    def pruned_fraction(self) -> float:
        return 1.0 - int(self.mask.sum()) / self.mask.numel()

    @torch.no_grad()
    def set_structure(self, group: torch.Tensor, keep: torch.Tensor) -> None:
        """Install a grouping: ``group`` [C_out] labels 0..g-1, ``keep`` [g, C_in] per-group input
        channels. Pruned weights are zeroed so a later regrouping cannot revive old values."""
        group = group.to(device=self.group.device, dtype=torch.long)
        keep = keep.to(device=self.mask.device, dtype=torch.bool)
        if group.shape != self.group.shape:
            raise ValueError(f"group has shape {tuple(group.shape)}, expected {tuple(self.group.shape)}")
        if keep.dim() != 2 or keep.shape[1] != self.mask.shape[1] or int(group.max()) >= keep.shape[0]:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, incompatible with the layer")
        self.group.copy_(group)
        self.mask.copy_(keep[group])
        self.zero_pruned_()

    def group_keep(self) -> torch.Tensor:
        """[g, C_in] kept input channels per group (one row per group, read off any member)."""
        g = self.num_groups
        keep = torch.zeros(g, self.mask.shape[1], dtype=torch.bool, device=self.mask.device)
        keep[self.group] = self.mask
        return keep

    def group_sizes(self) -> torch.Tensor:
        return torch.bincount(self.group, minlength=self.num_groups)

    def check_invariant(self) -> bool:
        """True when every filter's mask row equals its group's row."""
        return bool(torch.equal(self.group_keep()[self.group], self.mask))


class SGConv2d(_SelfGrouping, nn.Conv2d):
    """A Conv2d (groups == 1) whose connections are masked by a self-grouping structure."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.groups != 1:
            raise ValueError("SGConv2d replaces dense convolutions only (groups == 1)")
        self._init_structure(self.out_channels, self.in_channels)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> "SGConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class SGLinear(_SelfGrouping, nn.Linear):
    """A Linear layer whose connections are masked by a self-grouping structure."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_structure(self.out_features, self.in_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "SGLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


SG_LAYER_TYPES = (SGConv2d, SGLinear)


def is_sg_layer(module: nn.Module) -> bool:
    return isinstance(module, SG_LAYER_TYPES)
