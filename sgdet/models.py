"""Model builders (flat functions, torchvision style) and the architecture registry that lets a
checkpoint name the network it holds. Nothing here downloads weights: pretrained weights come
from a local file through ``load_dense_weights``."""
from __future__ import annotations

import importlib
import re
from typing import Callable

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_arch(name: str) -> Callable:
    """Decorator: make a builder ``fn(num_classes=...) -> nn.Module`` known by ``name``."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = fn
        return fn
    return wrap


class LeNet5(nn.Module):
    """The paper's LeNet-5 for 28x28 grey images: conv 20, conv 50, fc 500, fc 10 (431K params,
    2294K MACs)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(inplace=True), nn.Linear(500, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _tag(model: nn.Module, name: str, **kwargs) -> nn.Module:
    model.sgdet_arch = {"name": name, "kwargs": kwargs}
    return model


@register_arch("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return _tag(LeNet5(num_classes, in_channels), "lenet5", num_classes=num_classes,
                in_channels=in_channels)


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    # torchvision is imported on first build: importing it loads its detection models too, and
    # `import sgdet` must stay free of detection code
    def build(num_classes: int = 1000) -> nn.Module:
        import torchvision
        factory = getattr(torchvision.models, name)
        return _tag(factory(weights=None, num_classes=num_classes), name, num_classes=num_classes)

    build.__name__ = name
    build.__doc__ = f"torchvision {name}, randomly initialised (load weights from a local file)."
    return build


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121",
              "densenet161", "densenet169", "densenet201", "vgg11_bn", "vgg16_bn", "alexnet"):
    globals()[_name] = register_arch(_name)(_torchvision_builder(_name))


@register_arch("densenet121_cifar")
def densenet121_cifar(num_classes: int = 10) -> nn.Module:
    """The paper's DenseNet121 for 32x32 CIFAR images (section 5.2, Table 1): torchvision's
    DenseNet-BC (growth rate k=32, blocks 6-12-24-16, bottleneck 4k, compression 0.5) with a 3x3
    stride-1 first conv of 2k=64 channels and no initial max-pool, then global average pooling and
    a linear classifier. At 32x32 it has 888,350,720 MACs (paper: 888.36M; 888,442,880 for
    CIFAR-100 vs 888.45M) and 6,956,426 params counting every BatchNorm (7,048,676 for CIFAR-100);
    the paper prints 6.89M/6.99M, about 1% fewer, which no standard count of this structure gives
    (conv + linear weights alone are 6.87M). torchvision's _DenseLayer/_Transition modules are
    kept, so deploy() gathers their BatchNorms, and the state-dict keys are torchvision's
    (``features.pool0`` is an Identity holding nothing)."""
    import torchvision
    model = torchvision.models.DenseNet(growth_rate=32, block_config=(6, 12, 24, 16),
                                        num_init_features=64, bn_size=4, drop_rate=0,
                                        num_classes=num_classes)
    conv0 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv0.weight)          # torchvision's init for its convs
    model.features.conv0 = conv0
    model.features.pool0 = nn.Identity()
    return _tag(model, "densenet121_cifar", num_classes=num_classes)


_PRETTY = (("resnet", "ResNet"), ("densenet", "DenseNet"), ("vgg", "VGG"), ("lenet", "LeNet-"),
           ("alexnet", "AlexNet"))


def pretty_arch(arch: str) -> str:
    """resnet50 -> ResNet50, densenet121_cifar -> DenseNet121, lenet5 -> LeNet-5."""
    base = arch.split("_")[0]
    for prefix, name in _PRETTY:
        if base.startswith(prefix):
            return name + base[len(prefix):]
    return arch


# input size each architecture is counted at (the paper's convention)
INPUT_SIZES: dict[str, tuple[int, int, int]] = {"lenet5": (1, 28, 28),
                                                "densenet121_cifar": (3, 32, 32)}


def input_size_of(arch: str | dict) -> tuple[int, int, int]:
    """The input size ``arch`` is counted at: a registered name, or a checkpoint's ``arch`` entry
    (``{"name", "kwargs"}``), whose ``in_channels`` (a lenet5 for RGB data) sets the channels."""
    if isinstance(arch, dict):
        channels = (arch.get("kwargs") or {}).get("in_channels")
        size = input_size_of(str(arch.get("name")))
        return size if channels is None else (int(channels), *size[1:])
    return INPUT_SIZES.get(arch, (3, 224, 224))


# Architectures whose builders live in a module `import sgdet` does not load (detection pulls in
# torchvision's detection models): imported on first use, so a saved detector still loads.
LAZY_ARCHITECTURES: dict[str, str] = {"faster_rcnn": "sgdet.detection"}


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture; an unknown name lists the choices."""
    if name not in ARCHITECTURES and name in LAZY_ARCHITECTURES:
        importlib.import_module(LAZY_ARCHITECTURES[name])
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; choose from: {', '.join(sorted(ARCHITECTURES))}")
    try:
        return ARCHITECTURES[name](**kwargs)
    except TypeError as exc:   # e.g. faster_rcnn needs a backbone name; a wrong kwarg
        raise ConfigError(f"cannot build architecture {name!r} with {kwargs}: {exc}") from None


def _num_classes(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear) or getattr(m, "out_features", None) is not None:
            last = m
    return None if last is None else int(last.out_features)


def _dense_signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model as a dense network (SG buffers left out)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (k.endswith(".group") or k.endswith(".mask"))}


def arch_of(model: nn.Module) -> dict | None:
    """{'name', 'kwargs'} of the registered architecture ``model`` is an instance of, from its
    tag or by matching state-dict shapes against each builder of the same class; else None."""
    tag = getattr(model, "sgdet_arch", None)
    if tag is not None:
        return tag
    num_classes = _num_classes(model)
    if num_classes is None:
        return None
    signature = _dense_signature(model)
    for name, builder in ARCHITECTURES.items():
        if _BUILT_CLASS.get(name, type(model)) is not type(model):
            continue                      # known to build another class: skip the build
        try:
            with torch.device("meta"):
                candidate = builder(num_classes=num_classes)
        except TypeError:                 # a user builder without num_classes
            continue
        _BUILT_CLASS[name] = type(candidate)
        if type(candidate) is type(model) and _dense_signature(candidate) == signature:
            return dict(getattr(candidate, "sgdet_arch", None) or {"name": name, "kwargs": {"num_classes": num_classes}})
    return None


_BUILT_CLASS: dict[str, type] = {}   # builder name -> class it returns, learnt on first use


# torchvision's pre-0.3 DenseNet keys ("denselayer1.norm.1.weight"), renamed as torchvision does
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _unwrap_state_dict(blob):
    """The state dict inside a training checkpoint: ``{'state_dict'|'model'|'net': ...}`` (nested
    wrappers too, e.g. {'model': {'state_dict': ...}}), other entries (epoch, acc, optimizer)
    ignored."""
    for _ in range(4):
        if not isinstance(blob, dict) or all(isinstance(v, torch.Tensor) for v in blob.values()):
            break
        inner = next((blob[k] for k in ("state_dict", "model", "net", "model_state_dict")
                      if isinstance(blob.get(k), dict)), None)
        if inner is None:
            break
        blob = inner
    return blob


def _strip_prefixes(blob: dict) -> dict:
    """Drop ``module.`` (DataParallel / DistributedDataParallel) prefixes, also repeated ones, and
    rename old torchvision DenseNet keys."""
    out = {}
    for key, value in blob.items():
        while key.startswith("module."):
            key = key[len("module."):]
        match = _OLD_DENSENET_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def load_dense_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a dense state dict from a local file: torchvision's ``.pth``, or a training checkpoint
    wrapping it as ``{'state_dict' | 'model' | 'net': ...}`` (e.g. the authors' / pytorch-cifar
    style, extra keys such as epoch or acc ignored), with DataParallel ``module.`` prefixes
    stripped. Read with ``weights_only=True``: nothing but tensors and plain containers is ever
    unpickled."""
    import os
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    from .checkpoint import torch_load      # checkpoint imports this module
    blob = torch_load(path)
    blob = _unwrap_state_dict(blob)
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    blob = _strip_prefixes(blob)
    try:
        result = model.load_state_dict(blob, strict=False)
    except RuntimeError as exc:   # shape mismatches
        raise CheckpointError(f"{path} does not match the model: {str(exc).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3])
        raise CheckpointError(f"{path} does not match the model (missing: {missing or '-'}; "
                              f"unexpected: {', '.join(result.unexpected_keys[:3]) or '-'})")
    return model
