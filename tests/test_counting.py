"""Tests params/FLOPs counting (sgdet.count) of dense, masked and deployed models, incl. Table 3."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sgdet
from sgdet.counting import format_count

from conftest import dropped_inputs, empty_groups, make_densenet, make_lenet, make_resnet18, seed_all


def flop_counter_macs(model: nn.Module, input_size) -> float:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() / 2


def test_lenet5_baseline():
    c = sgdet.count(make_lenet(), (1, 28, 28))
    assert c["params"] == 431_080
    # conv1 24*24*20*25, conv2 8*8*50*20*25, fc 800*500 and 500*10
    assert c["flops"] == 24 * 24 * 20 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10
    assert abs(c["flops"] - 2_294_000) / 2_294_000 < 1e-3      # the paper's 2294K
    assert format_count(c["params"]) == "431K"


def test_count_flops_is_per_example():
    model = make_lenet()
    sgdet.compress(model, 0.5, 0.5, groups=4, step=None)
    single = sgdet.count_flops(model, (1, 28, 28))
    assert sgdet.count_flops(model, example=torch.zeros(3, 1, 28, 28)) == single


def test_masked_count_matches_hand_computation():
    model = make_lenet()
    sgdet.compress(model, conv_ratio=0.7, fc_ratio=0.8, groups=4, step=None)
    conv, fc1, fc2 = model.features[3], model.classifier[1], model.classifier[3]
    k = 25
    pruned_params = (int((~conv.mask).sum()) * k + int((~fc1.mask).sum()) + int((~fc2.mask).sum()))
    c = sgdet.count(model, (1, 28, 28))
    assert c["params"] == 431_080 - pruned_params
    flops = (24 * 24 * 20 * 25 + 8 * 8 * int(conv.mask.sum()) * k + int(fc1.mask.sum())
             + int(fc2.mask.sum()))
    assert c["flops"] == flops
    assert c["params"] < 0.35 * 431_080


@pytest.fixture(scope="module")
def resnet50_base():
    seed_all(0)
    return torchvision.models.resnet50()


def test_resnet50_baseline(resnet50_base):
    c = sgdet.count(resnet50_base)
    assert c["params"] == 25_557_032
    assert format_count(c["params"]) == "25.56M"
    assert format_count(c["flops"]) == "4.09G"
    assert c["flops"] == pytest.approx(flop_counter_macs(resnet50_base, (3, 224, 224)), rel=1e-9)


@pytest.mark.parametrize("conv_ratio,params,flops", [(0.6, 11.88e6, 1.91e9),
                                                     (0.7, 9.83e6, 1.55e9),
                                                     (0.8, 7.76e6, 1.20e9)])
def test_table3_resnet50(resnet50_base, conv_ratio, params, flops):
    model = copy.deepcopy(resnet50_base)
    sgdet.compress(model, conv_ratio=conv_ratio, fc_ratio=0.6, groups=16, step=None)
    c = sgdet.count(model)
    assert abs(c["params"] - params) / params < 0.015, c
    assert abs(c["flops"] - flops) / flops < 0.015, c
    # the downsample convs and the stem are counted dense
    assert type(model.conv1) is nn.Conv2d and type(model.layer1[0].downsample[0]) is nn.Conv2d


def _gathered_bn_params_saved(masked: nn.Module, deployed: nn.Module) -> int:
    saved = 0
    for name, m in deployed.named_modules():
        if isinstance(m, sgdet.GatheredBatchNorm2d):
            original = masked.get_submodule(name)
            saved += sum(p.numel() for p in original.parameters()) - sum(p.numel() for p in m.parameters())
    return saved


@pytest.mark.parametrize("name,build,size,ratio", [
    ("lenet5", make_lenet, (1, 28, 28), 0.6),
    ("resnet18", make_resnet18, (3, 64, 64), 0.6),
    ("densenet", make_densenet, (3, 32, 32), 0.5),
])
def test_deployed_count_equals_masked_and_flop_counter(name, build, size, ratio):
    model = build()
    dense = sgdet.count(model, size)
    sgdet.compress(model, conv_ratio=ratio, fc_ratio=ratio, groups=8, step=None)
    # precondition of the FlopCounterMode comparison: no conv group lost all its inputs
    # (see test_flop_counter_with_empty_group for that case)
    assert all(empty_groups(m) == 0 for m in sgdet.sg_layers(model).values()
               if isinstance(m, sgdet.SGConv2d)), name
    masked = sgdet.count(model, size)
    deployed_model = sgdet.deploy(model)
    deployed = sgdet.count(deployed_model, size)
    assert masked["flops"] < dense["flops"] and masked["params"] < dense["params"]
    assert deployed["flops"] == masked["flops"]
    # a GatheredBatchNorm2d drops the affine params of channels no group reads; nothing else differs
    assert deployed["params"] == masked["params"] - _gathered_bn_params_saved(model, deployed_model)
    assert deployed["params"] == sum(p.numel() for p in deployed_model.parameters())
    assert flop_counter_macs(deployed_model, size) == deployed["flops"]


def test_densenet_gathered_bn_params_are_the_only_difference():
    model = make_densenet()
    sgdet.compress(model, conv_ratio=0.9, fc_ratio=0.9, groups=8, step=None)
    assert any(dropped_inputs(m) for m in sgdet.sg_layers(model).values())
    deployed = sgdet.deploy(model)
    saved = _gathered_bn_params_saved(model, deployed)
    assert saved > 0
    assert sgdet.count_params(deployed) == sgdet.count_params(model) - saved
    assert sgdet.count_flops(deployed, (3, 32, 32)) == sgdet.count_flops(model, (3, 32, 32))


def test_flop_counter_with_empty_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), sgdet.SGConv2d(6, 8, 3))
    group = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    keep = torch.tensor([[False] * 6, [True, False, True, False, False, False], [True] * 6])
    model[1].set_structure(group, keep)
    deployed = sgdet.deploy(model)
    assert deployed[1].group_in == [0, 2, 6]
    c = sgdet.count(deployed, (3, 16, 16))
    assert c["flops"] == sgdet.count(model, (3, 16, 16))["flops"]
    assert flop_counter_macs(deployed, (3, 16, 16)) == c["flops"]
