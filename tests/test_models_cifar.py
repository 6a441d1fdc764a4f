"""The paper's DenseNet121 for CIFAR (densenet121_cifar): size, shape, compression + deployment,
checkpoints, and loading dense weights saved in training-script styles."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import densenet as tv_densenet

import sgdet
from sgdet.deploy import GatheredBatchNorm2d
from sgdet.errors import CheckpointError
from sgdet.models import INPUT_SIZES, arch_of, input_size_of, load_dense_weights

from conftest import assert_same_output, exact_pruned, randomize_bn

PAPER = {10: (6.89e6, 888.36e6), 100: (6.99e6, 888.45e6)}   # Tables 1 and 2 (params, FLOPs)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return sgdet.build("densenet121_cifar").eval()


def _fresh(seed=0, num_classes=10):
    torch.manual_seed(seed)
    return sgdet.build("densenet121_cifar", num_classes=num_classes).eval()


def test_registered_with_its_input_size():
    assert "densenet121_cifar" in sgdet.ARCHITECTURES
    assert INPUT_SIZES["densenet121_cifar"] == (3, 32, 32) == input_size_of("densenet121_cifar")


@pytest.mark.parametrize("num_classes", [10, 100])
def test_size_matches_the_paper(num_classes):
    model = _fresh(num_classes=num_classes)
    counted = sgdet.count(model, input_size_of("densenet121_cifar"))
    exact = {10: (6_956_426, 888_350_720), 100: (7_048_676, 888_442_880)}[num_classes]
    assert (counted["params"], counted["flops"]) == exact
    params, flops = PAPER[num_classes]
    assert abs(counted["flops"] - flops) / flops < 1e-4           # 888.35M vs the paper's 888.36M
    assert abs(counted["params"] - params) / params < 0.011       # BN params included: paper prints 6.89M


def test_architecture(net):
    f = net.features
    assert isinstance(f.conv0, nn.Conv2d) and f.conv0.kernel_size == (3, 3)
    assert f.conv0.stride == (1, 1) and f.conv0.out_channels == 64 and f.conv0.in_channels == 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert sum(isinstance(m, tv_densenet._DenseLayer) for m in net.modules()) == 6 + 12 + 24 + 16
    assert sum(isinstance(m, tv_densenet._Transition) for m in net.modules()) == 3
    assert all(m.conv2.out_channels == 32 and m.conv1.out_channels == 128
               for m in net.modules() if isinstance(m, tv_densenet._DenseLayer))
    assert [m.conv.out_channels for m in net.modules() if isinstance(m, tv_densenet._Transition)] == [128, 256, 512]
    assert net.classifier.in_features == 1024 and net.classifier.out_features == 10


def test_forward_keeps_32px_resolution_until_the_transitions(net):
    sizes = {}
    hooks = [getattr(net.features, n).register_forward_hook(
        lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[1:])))
        for n in ("conv0", "denseblock1", "denseblock4", "norm5")]
    try:
        with torch.no_grad():
            out = net(torch.randn(2, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert sizes == {"conv0": (64, 32, 32), "denseblock1": (256, 32, 32),
                     "denseblock4": (1024, 4, 4), "norm5": (1024, 4, 4)}


def test_arch_of_identifies_untagged_copies(net):
    plain = copy.deepcopy(net)
    del plain.sgdet_arch
    assert arch_of(plain) == {"name": "densenet121_cifar", "kwargs": {"num_classes": 10}}
    imagenet_style = torchvision.models.densenet121(num_classes=10)
    assert arch_of(imagenet_style)["name"] == "densenet121"


@pytest.fixture(scope="module")
def compressed():
    model = randomize_bn(_fresh(seed=1))
    records = sgdet.compress(model, conv_ratio=0.8, fc_ratio=0.8, groups=8, step=None, seed=0)
    return model.eval(), records


def test_compress_and_deploy_exact(compressed):
    model, records = compressed
    layers = sgdet.sg_layers(model)
    assert "features.conv0" not in layers and len(layers) == 2 * 58 + 3 + 1
    for name, layer in layers.items():
        assert abs(exact_pruned(layer) - 0.8) < 0.02, name
        assert layer.check_invariant()
    assert abs(records[-1].conv_pruned - 0.8) < 0.01
    torch.manual_seed(2)
    x = torch.randn(3, 3, 32, 32) * 2
    with torch.no_grad():
        reference = model(x)
    deployed = sgdet.deploy(model)
    with torch.no_grad():
        out = deployed(x)
    assert_same_output(reference, out)
    assert sum(isinstance(m, GatheredBatchNorm2d) for m in deployed.modules()) > 50
    masked, small = sgdet.count(model, (3, 32, 32)), sgdet.count(deployed, (3, 32, 32))
    assert small["flops"] == masked["flops"] < 0.3 * 888_350_720
    assert small["params"] <= masked["params"] < 0.3 * 6_956_426
    assert arch_of(deployed)["name"] == "densenet121_cifar"


@pytest.mark.parametrize("form", ["dense", "masked", "deployed"])
def test_checkpoint_round_trip_without_model(tmp_path, compressed, form):
    model = {"dense": lambda: randomize_bn(_fresh(seed=3)), "masked": lambda: compressed[0],
             "deployed": lambda: sgdet.deploy(compressed[0])}[form]().eval()
    path = tmp_path / f"{form}.sg.pt"
    sgdet.save(model, path, meta={"dataset": "cifar10"})
    loaded = sgdet.load(path).eval()
    assert loaded.sgdet_arch["name"] == "densenet121_cifar" and loaded.sgdet_meta == {"dataset": "cifar10"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert sgdet.count(loaded, (3, 32, 32)) == sgdet.count(model, (3, 32, 32))


# ----------------------------------------------------------------------------- load_dense_weights

def _trained_state():
    source = randomize_bn(_fresh(seed=4))
    return source, {k: v.clone() for k, v in source.state_dict().items()}


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("style", ["plain", "state_dict", "net_dataparallel", "model_nested",
                                   "old_densenet_keys"])
def test_load_dense_weights_checkpoint_styles(tmp_path, style):
    source, state = _trained_state()
    if style == "plain":
        blob = state
    elif style == "state_dict":
        blob = {"state_dict": state, "epoch": 199, "best_prec1": 95.23, "arch": "densenet121"}
    elif style == "net_dataparallel":
        blob = {"net": {"module." + k: v for k, v in state.items()}, "acc": 95.23, "epoch": 199}
    elif style == "model_nested":
        blob = {"model": {"state_dict": {"module." + k: v for k, v in state.items()}}}
    else:                                     # torchvision < 0.3 DenseNet naming: norm.1, conv.2
        blob = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()}
        assert any(".norm.1." in k for k in blob)
    path = tmp_path / f"{style}.pth"
    torch.save(blob, path)
    target = _fresh(seed=5)
    assert not _same_weights(target, source)
    load_dense_weights(target, str(path))
    assert _same_weights(target, source)


def test_load_dense_weights_refuses_pickled_modules_and_mismatches(tmp_path):
    pickled = tmp_path / "module.pth"
    torch.save(nn.Sequential(nn.Linear(2, 2)), pickled)
    with pytest.raises(CheckpointError, match=r"module.pth is not a safe sgdet checkpoint \(it holds a pickled "
                       r"torch.nn.modules.container.Sequential"):
        load_dense_weights(_fresh(), str(pickled))
    imagenet = tmp_path / "imagenet.pth"
    torch.save(torchvision.models.densenet121(num_classes=10).state_dict(), imagenet)
    with pytest.raises(CheckpointError, match="does not match the model.*conv0"):
        load_dense_weights(_fresh(), str(imagenet))
    empty = tmp_path / "empty.pth"
    torch.save({"net": {}, "epoch": 3}, empty)
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        load_dense_weights(_fresh(), str(empty))
