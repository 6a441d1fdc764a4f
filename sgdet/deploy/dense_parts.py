"""Deployment, fast stage, the dense parts: the layers compression leaves dense (a ResNet's stem
and shortcut convs, a DenseNet's stem) run as TorchScript's frozen graph runs them, so the fixed
cost outside the diverse group convs shrinks as well:

* FoldedConv2d: a dense conv that applies the BatchNorm after it (a FoldedBatchNorm2d, which then
  passes its input through) by folding it into its weights, as ``fuse_conv_bn_eval`` does; the
  folded tensors are cached and rebuilt when a weight or BN statistic changes.
* ChannelsLastMaxPool2d: a max-pool run in channels_last and returned as NCHW (the native
  kernels' layout). torch's NCHW max-pool is scalar: on a ResNet50 stem at batch 8 it took 23 ms
  where the channels_last one took 3 ms; a stem conv asked for channels_last output feeds it
  without a conversion (only its 3-channel input is converted). Other max-pools (LeNet-5's,
  VGG's) convert in and out around it where that is timed faster.

Both keep the state-dict keys of the modules they replace and compute the same function in every
mode (training and autograd use the plain conv and BN)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import FoldedBatchNorm2d, link_folded_norms
from .patterns import dense_conv_bn_pairs, stem_pools
from .timing import time_interleaved


class FoldedConv2d(nn.Conv2d):
    """An nn.Conv2d that applies its linked FoldedBatchNorm2d through folded weights in eval mode
    without autograd. ``channels_last``: emit channels_last (a stem whose pool runs in it)."""

    folds_batchnorm = True            # link_folded_norms may link a FoldedBatchNorm2d to it

    def __init__(self, *args, channels_last: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channels_last = bool(channels_last)
        object.__setattr__(self, "_folded_bn", None)
        self._cache: tuple | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, channels_last: bool = False) -> "FoldedConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  channels_last=channels_last, device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        new.train(conv.training)
        return new

    def structure(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "padding_mode": self.padding_mode, "channels_last": self.channels_last}

    def refresh(self) -> None:
        self._cache = None

    def folds(self, bn: nn.Module) -> bool:
        """Whether this call applies ``bn`` (eval mode, no autograd: the BN then passes through)."""
        return self._folded_bn is bn and not self.training and not torch.is_grad_enabled()

    def _tracked(self) -> tuple:
        return tuple(t for t in (self.weight, self.bias) if t is not None) + self._folded_bn.tracked()

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self._folded_bn.inference_affine()
        bias = shift if self.bias is None else self.bias * scale + shift
        weight = self.weight * scale.view(-1, *([1] * (self.weight.dim() - 1)))
        if self.channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        return weight, bias

    @torch.no_grad()
    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._fold()       # in the graph: tensor versions are not traceable
        key = tuple((t.data_ptr(), t._version) for t in self._tracked())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self._fold())
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._folded_bn is None or not self.folds(self._folded_bn):
            return super().forward(x)
        weight, bias = self._folded()
        return self._conv_forward(x, weight, bias)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d computed in channels_last (vectorised over channels) with an NCHW output."""

    def structure(self) -> dict:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "ceil_mode": self.ceil_mode}

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> "ChannelsLastMaxPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, False, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x).contiguous()


@torch.no_grad()
def fold_dense_convs(model: nn.Module) -> list[str]:
    """Give every plain conv followed directly by a BN (registered pairs, nn.Sequential runs) its
    BN folded in; returns the convs' names."""
    folded = []
    for conv_name, bn_name in dense_conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.running_var is None:
            continue
        model.set_submodule(conv_name, FoldedConv2d.from_conv(conv), strict=True)
        model.set_submodule(bn_name, FoldedBatchNorm2d.from_bn(bn, conv_name), strict=True)
        folded.append(conv_name)
    if folded:
        link_folded_norms(model)
    return folded


@torch.no_grad()
def pool_stems_channels_last(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 5,
                             margin: float = 0.05) -> list[str]:
    """Run each stem (folded conv -> BN -> element-wise -> max-pool) in channels_last, converting
    to NCHW at the pool's output, where that is faster by ``margin`` on the stem conv's real
    input (``inputs``: conv name -> its input). Returns the pools' names."""
    moved = []
    for conv_name, pool_name in stem_pools(model):
        conv, pool, x = model.get_submodule(conv_name), model.get_submodule(pool_name), inputs.get(conv_name)
        if (not isinstance(conv, FoldedConv2d) or conv._folded_bn is None or type(pool) is not nn.MaxPool2d
                or x is None or x.dim() != 4 or x.device.type != "cpu"):
            continue
        trial_conv = FoldedConv2d.from_conv(conv, channels_last=True).eval()
        object.__setattr__(trial_conv, "_folded_bn", conv._folded_bn)
        trial_pool = ChannelsLastMaxPool2d.from_pool(pool)
        seconds = time_interleaved({"nchw": lambda: pool(F.relu(conv(x))),
                                    "channels_last": lambda: trial_pool(F.relu(trial_conv(x)))},
                                   repeats=repeats, warmup=2, device=x.device)
        if seconds["channels_last"] < (1.0 - margin) * seconds["nchw"]:
            conv.channels_last = True
            conv.refresh()
            model.set_submodule(pool_name, trial_pool, strict=True)
            moved.append(pool_name)
    return moved


@torch.no_grad()
def pools_channels_last(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 5,
                        margin: float = 0.05) -> list[str]:
    """Run each remaining plain max-pool in channels_last, its NCHW input converted in and its
    output back, where that is faster by ``margin`` on the pool's real input (``inputs``: pool
    name -> its input); on a trained LeNet-5 at batch 8 the NCHW pools were a quarter of the
    deployed forward. Returns the pools' names."""
    moved = []
    for name, pool in list(model.named_modules()):
        x = inputs.get(name)
        if (type(pool) is not nn.MaxPool2d or pool.return_indices or x is None or x.dim() != 4
                or x.device.type != "cpu" or x.is_contiguous(memory_format=torch.channels_last)):
            continue
        trial = ChannelsLastMaxPool2d.from_pool(pool)
        seconds = time_interleaved({"nchw": lambda: pool(x), "channels_last": lambda: trial(x)},
                                   repeats=repeats, warmup=2, device=x.device)
        if seconds["channels_last"] < (1.0 - margin) * seconds["nchw"]:
            model.set_submodule(name, trial, strict=True)
            moved.append(name)
    return moved
