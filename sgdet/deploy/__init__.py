"""Deployment: a compressed (masked) model made into one that runs with only its kept weights.

Stages, one module each: ``convert`` (deploy(): SG layers become the exact diverse group modules
of ``modules``, BNs gathered where ``patterns`` allows), ``optimize`` (the fast stage: folded
permutations, dead channels, execution ``plans`` chosen with ``timing``, the ``dense_parts``
left dense run with folded BNs) and ``export``
(TorchScript / ONNX files). ``native`` holds the C++ kernels that run diverse groups without
gathering their inputs; the fast stage uses them where they are built."""
import sys
import types

from .convert import deploy
from .dense_parts import ChannelsLastMaxPool2d, FoldedConv2d
from .export import export
from .modules import (DiverseGroupConv2d, DiverseGroupLinear, FoldedBatchNorm2d, GatheredBatchNorm2d,
                      select_channels)
from .optimize import capture_inputs, optimize
from .patterns import register_bn_conv_pairs, register_conv_bn, register_conv_bn_conv, register_stem_pool
from .timing import time_interleaved

__all__ = [
    "deploy", "DiverseGroupConv2d", "DiverseGroupLinear", "GatheredBatchNorm2d",
    "register_bn_conv_pairs", "register_conv_bn_conv", "optimize", "export", "select_channels",
    "time_interleaved", "capture_inputs", "FoldedBatchNorm2d", "register_conv_bn",
    "FoldedConv2d", "ChannelsLastMaxPool2d", "register_stem_pool",
]


class _CallableModule(types.ModuleType):
    """``sgdet.deploy`` is this package and ``sgdet.deploy(model, ...)`` calls deploy(): the
    function's name used to hide the package, so ``import sgdet.deploy.native as native`` and
    ``sgdet.deploy.native`` failed."""

    def __call__(self, *args, **kwargs):
        return deploy(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
