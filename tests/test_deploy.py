"""Tests exact deployment (sgdet.deploy) of masked models into diverse group convolutions."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import sgdet
from sgdet import DiverseGroupConv2d, DiverseGroupLinear, GatheredBatchNorm2d

from conftest import (assert_same_output, dense_from_deployed, dropped_inputs, empty_groups,
                      is_compressed_type, make_densenet, make_lenet, make_resnet18, make_vgg,
                      randomize_bn)

CASES = {
    # name: (builder, input size, expects a conv/fc group with no inputs, expects gathered BN)
    "lenet5": (make_lenet, (1, 28, 28), True, False),
    "resnet18": (make_resnet18, (3, 64, 64), False, False),
    "densenet": (make_densenet, (3, 32, 32), True, True),
    "vgg": (make_vgg, (3, 32, 32), True, True),
}


def _compressed(name, ratio=0.9, groups=16):
    build, size, _, _ = CASES[name]
    model = randomize_bn(build())
    sgdet.compress(model, conv_ratio=ratio, fc_ratio=ratio, groups=groups, step=None)
    model.eval()
    return model, size


@pytest.fixture(scope="module")
def compressed():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _compressed(name)
        return cache[name]
    return get


def _bn_index(deployed, conv_name):
    """channel_index of the GatheredBatchNorm2d feeding ``conv_name`` (DenseNet/Sequential)."""
    parent, _, attr = conv_name.rpartition(".")
    module = deployed.get_submodule(parent)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        i = names.index(attr) - 1
        while i >= 0 and not isinstance(module[i], nn.BatchNorm2d):
            i -= 1
        bn = module[i] if i >= 0 else None
    else:
        bn = getattr(module, attr.replace("conv", "norm"), None)
    return bn.channel_index if isinstance(bn, GatheredBatchNorm2d) else None


@pytest.mark.parametrize("name", list(CASES))
def test_deploy_is_exact_in_eval_mode(name, compressed):
    model, size = compressed(name)
    _, _, expect_empty, expect_gathered = CASES[name]
    layers = sgdet.sg_layers(model)
    assert any(dropped_inputs(m) for m in layers.values())          # some inputs are dropped
    if expect_empty:
        assert any(empty_groups(m) for m in layers.values())        # some groups read nothing
    torch.manual_seed(1)
    x = torch.randn(4, *size)
    with torch.no_grad():
        ref = model(x)
    deployed = sgdet.deploy(model)
    deployed.eval()
    assert not any(is_compressed_type(m) for m in deployed.modules())
    kinds = {type(m) for m in deployed.modules()}
    assert DiverseGroupConv2d in kinds and DiverseGroupLinear in kinds
    assert (GatheredBatchNorm2d in kinds) == expect_gathered
    with torch.no_grad():
        out = deployed(x)
    assert_same_output(ref, out)
    assert out.abs().max() > 0
    dense_params = sum(p.numel() for p in CASES[name][0]().parameters())
    deployed_params = sum(p.numel() for p in deployed.parameters())
    assert deployed_params < dense_params
    if name != "resnet18":        # resnet18's dense stem and downsample convs weigh more
        assert deployed_params < 0.5 * dense_params
    # each deployed layer holds exactly the masked layer's kept weights, in the right places
    for layer_name, sg in layers.items():
        new = deployed.get_submodule(layer_name)
        assert sum(w.numel() for w in new.weights) == sg.kept_connections()
        rebuilt = dense_from_deployed(new, channel_index=_bn_index(deployed, layer_name))
        assert torch.equal(rebuilt, sg.masked_weight().detach()), layer_name
        assert new.group_out == sg.group_sizes().tolist()
        assert new.group_in == sg.group_keep().sum(1).tolist()


def test_gathered_bn_selects_only_read_channels(compressed):
    model, _ = compressed("densenet")
    deployed = sgdet.deploy(model)
    gathered = {n: m for n, m in deployed.named_modules() if isinstance(m, GatheredBatchNorm2d)}
    assert gathered
    for name, bn in gathered.items():
        conv_name = name.replace("norm", "conv")
        sg = model.get_submodule(conv_name)
        used = torch.nonzero(sg.mask.any(0)).flatten()
        assert torch.equal(bn.channel_index, used)
        assert bn.num_features == used.numel() < bn.in_channels == sg.in_channels
        original = model.get_submodule(name)
        assert torch.equal(bn.weight, original.weight[used])
        assert torch.equal(bn.running_var, original.running_var[used])
        assert deployed.get_submodule(conv_name).in_channels == used.numel()


def test_deploy_does_not_modify_its_input(compressed):
    model, size = compressed("densenet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    deployed = sgdet.deploy(model)
    assert deployed is not model
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and they share no parameter storage
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ptrs for p in deployed.parameters())


def test_deploy_inplace_returns_the_same_model():
    model, size = _compressed("lenet5", ratio=0.6, groups=4)
    x = torch.randn(2, *size)
    ref = model(x)
    out_model = sgdet.deploy(model, inplace=True)
    assert out_model is model
    assert not any(is_compressed_type(m) for m in model.modules())
    assert_same_output(ref, model(x))


def test_deploy_tags_inferred_architecture():
    model = make_resnet18()
    assert not hasattr(model, "sgdet_arch")
    sgdet.compress(model, 0.3, 0.3, groups=16, step=None)
    deployed = sgdet.deploy(model)
    assert deployed.sgdet_arch == {"name": "resnet18", "kwargs": {"num_classes": 10}}


def test_train_mode_exactness_and_gradients_lenet():
    model = make_lenet()
    sgdet.compress(model, conv_ratio=0.9, fc_ratio=0.9, groups=16, step=None)
    model.train()
    deployed = sgdet.deploy(model)
    assert deployed.training and all(m.training for m in deployed.modules())
    torch.manual_seed(3)
    x = torch.randn(8, 1, 28, 28)
    target = torch.randint(0, 10, (8,))
    loss_ref = nn.functional.cross_entropy(model(x), target)
    loss_dep = nn.functional.cross_entropy(deployed(x), target)
    assert loss_dep.item() == pytest.approx(loss_ref.item(), rel=1e-5, abs=1e-6)
    loss_ref.backward()
    loss_dep.backward()
    for name, sg in sgdet.sg_layers(model).items():
        new = deployed.get_submodule(name)
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in new.weights]
        assert all(w.grad is not None for w in new.weights if w.numel())
        rebuilt = dense_from_deployed(new, tensors=grads)
        assert torch.allclose(rebuilt, sg.weight.grad, atol=1e-6, rtol=1e-4), name
        assert float(rebuilt.abs().sum()) > 0
        order = torch.argsort(new.out_order)          # deployed bias is stored group by group
        assert torch.allclose(new.bias.grad, sg.bias.grad[order], atol=1e-6, rtol=1e-4)
    # an optimiser step on the deployed model changes its weights and keeps it finite
    opt = torch.optim.SGD(deployed.parameters(), lr=0.1)
    before = [w.detach().clone() for w in deployed.classifier[1].weights]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, deployed.classifier[1].weights))
    assert bool(torch.isfinite(deployed(x)).all())


def test_train_mode_exactness_with_gathered_batchnorm():
    model, size = _compressed("densenet")
    model.train()
    deployed = sgdet.deploy(model)
    assert any(isinstance(m, GatheredBatchNorm2d) for m in deployed.modules())
    torch.manual_seed(4)
    x = torch.randn(6, *size)
    ref = model(x)
    out = deployed(x)
    assert_same_output(ref, out)
    # running statistics advance identically on the kept channels
    for name, bn in deployed.named_modules():
        if isinstance(bn, GatheredBatchNorm2d):
            original = model.get_submodule(name)
            assert torch.allclose(bn.running_mean, original.running_mean[bn.channel_index], atol=1e-6)
            assert torch.allclose(bn.running_var, original.running_var[bn.channel_index], atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in deployed.parameters() if p.requires_grad and p.numel())


def test_deploy_of_a_dense_model_is_a_copy():
    model = make_lenet().eval()
    deployed = sgdet.deploy(model)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), deployed(x))
    assert [type(m) for m in deployed.modules()] == [type(m) for m in model.modules()]


def test_deploy_float64_model_with_gathered_bn():
    model = make_densenet().double()
    sgdet.compress(model, conv_ratio=0.9, fc_ratio=0.9, groups=8, step=None)
    model.eval()
    deployed = sgdet.deploy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_same_output(model(x), deployed(x))
