"""Shared fixtures and helpers for the sgdet tests: tiny seeded models and exactness checks."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torchvision
from torch import nn

import sgdet

torch.set_num_threads(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)


def make_lenet(seed: int = 0) -> nn.Module:
    seed_all(seed)
    return sgdet.build("lenet5")


def make_resnet18(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """torchvision resnet18 built directly (not through sgdet.build): untagged."""
    seed_all(seed)
    return torchvision.models.resnet18(num_classes=num_classes)


def make_bottleneck_resnet(seed: int = 0) -> nn.Module:
    """A one-block-per-stage ResNet of torchvision Bottlenecks (10 classes)."""
    torch.manual_seed(seed)
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                            num_classes=10)


def make_densenet(seed: int = 0) -> nn.Module:
    seed_all(seed)
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                       bn_size=2, num_classes=10)


def make_vgg(seed: int = 0) -> nn.Module:
    """A small VGG-style net: conv-bn-relu blocks (BN feeding a conv through ReLU) + classifier."""
    seed_all(seed)

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32),
                         *block(32, 48), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(48 * 4, 64), nn.ReLU(inplace=True), nn.Linear(64, 10))


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics so that eval-mode
    comparisons exercise them (fresh BNs are the identity up to eps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def output_atol(reference: torch.Tensor, rel: float = 1e-5) -> float:
    return rel * max(1.0, float(reference.detach().abs().max()))


def assert_same_output(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    atol = output_atol(a, rel)
    diff = float((a - b).detach().abs().max())
    assert diff <= atol, f"outputs differ by {diff:.3g} (allowed {atol:.3g})"


def is_compressed_type(m: nn.Module) -> bool:
    return isinstance(m, (sgdet.SGConv2d, sgdet.SGLinear))


def exact_pruned(layer: nn.Module) -> float:
    """Pruned fraction of an SG layer's mask in float64 (layer.pruned_fraction() is float32)."""
    return 1 - int(layer.mask.sum()) / layer.mask.numel()


def empty_groups(layer: nn.Module) -> int:
    """Groups of an SG layer that kept no input channel."""
    return int((~layer.group_keep().any(1)).sum())


def dropped_inputs(layer: nn.Module) -> int:
    """Input channels of an SG layer that no filter reads."""
    return int((~layer.mask.any(0)).sum())


def dense_from_deployed(layer: nn.Module, tensors=None, channel_index=None) -> torch.Tensor:
    """Scatter a deployed layer's per-group weights (or ``tensors``, e.g. their grads) back into the
    dense [C_out, C_in_source, ...] layout, independently of sgdet's own bookkeeping helpers.
    ``channel_index``: the GatheredBatchNorm2d index when the layer reads a gathered input."""
    tensors = list(layer.weights) if tensors is None else list(tensors)
    kernel = tuple(layer.weights[0].shape[2:]) if len(layer.weights) else ()
    out = torch.zeros(layer.out_features_total, layer.source_in, *kernel, dtype=tensors[0].dtype)
    order = torch.argsort(layer.out_order)          # position in the concatenation -> filter
    in_index = layer.in_index if channel_index is None else channel_index[layer.in_index]
    s_out = s_in = 0
    for t, o, i in zip(tensors, layer.group_out, layer.group_in):
        filters = order[s_out:s_out + o]
        channels = in_index[s_in:s_in + i]
        out[filters.view(-1, 1), channels.view(1, -1)] = t.detach()
        s_out += o
        s_in += i
    return out


@pytest.fixture
def lenet():
    return make_lenet()


@pytest.fixture
def resnet18():
    return make_resnet18()


@pytest.fixture
def densenet():
    return make_densenet()


@pytest.fixture
def vgg():
    return make_vgg()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): on a shared 2-core machine two threads spin against other processes and run
    small detection convolutions several times slower (measured 2.3 s vs 11 s per step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
