"""Tests the masked self-grouping layers SGConv2d and SGLinear (sgdet.layers)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdet import SGConv2d, SGLinear


def _conv(bias=True, **kw):
    torch.manual_seed(0)
    return nn.Conv2d(6, 8, 3, bias=bias, **kw)


def _random_structure(c_out, c_in, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    group = torch.arange(c_out) % g
    group = group[torch.randperm(c_out, generator=gen)]
    keep = torch.rand(g, c_in, generator=gen) > 0.5
    keep[0] = False                      # one group reads nothing
    keep[1, 0] = True                    # ... and another certainly reads channel 0
    return group, keep


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2),
                                dict(padding="same"), dict(bias=False)])
def test_conv_from_dense_copies_weights_and_matches_dense(kw):
    conv = _conv(**kw)
    conv.eval()
    sg = SGConv2d.from_dense(conv)
    assert sg.weight is not conv.weight
    assert torch.equal(sg.weight, conv.weight)
    assert (sg.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(sg.bias, conv.bias)
    assert (sg.stride, sg.padding, sg.dilation) == (conv.stride, conv.padding, conv.dilation)
    assert sg.training is False
    x = torch.randn(2, 6, 11, 11)
    assert torch.equal(sg(x), conv(x))
    # the copy is independent of the source layer
    with torch.no_grad():
        conv.weight.add_(1.0)
    assert not torch.equal(sg.weight, conv.weight)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_from_dense_copies_weights_and_matches_dense(bias):
    torch.manual_seed(0)
    lin = nn.Linear(7, 5, bias=bias)
    sg = SGLinear.from_dense(lin)
    assert torch.equal(sg.weight, lin.weight)
    x = torch.randn(3, 4, 7)
    assert torch.equal(sg(x), lin(x))


def test_buffers_dtypes_and_shapes():
    sg = SGConv2d.from_dense(_conv())
    assert sg.group.dtype == torch.long and tuple(sg.group.shape) == (8,)
    assert sg.mask.dtype == torch.bool and tuple(sg.mask.shape) == (8, 6)
    assert bool(sg.mask.all()) and int(sg.group.abs().sum()) == 0
    assert sg.num_groups == 1
    names = dict(sg.named_buffers())
    assert set(names) == {"group", "mask"}
    lin = SGLinear.from_dense(nn.Linear(7, 5))
    assert lin.group.dtype == torch.long and tuple(lin.group.shape) == (5,)
    assert lin.mask.dtype == torch.bool and tuple(lin.mask.shape) == (5, 7)
    assert {"group", "mask"} <= set(lin.state_dict())


def test_grouped_conv_rejected():
    with pytest.raises(ValueError):
        SGConv2d(4, 4, 3, groups=2)


def test_set_structure_installs_groups_and_zeroes_pruned_weights():
    sg = SGConv2d.from_dense(_conv())
    original = sg.weight.detach().clone()
    group, keep = _random_structure(8, 6, 3)
    sg.set_structure(group, keep)
    assert torch.equal(sg.group, group)
    assert torch.equal(sg.mask, keep[group])
    assert sg.check_invariant()
    assert sg.num_groups == 3
    assert torch.equal(sg.group_keep(), keep)
    assert sg.group_sizes().tolist() == torch.bincount(group).tolist()
    mask4 = keep[group][:, :, None, None]
    assert bool((sg.weight[~mask4.expand_as(sg.weight)] == 0).all())
    assert torch.equal(sg.weight[mask4.expand_as(sg.weight)], original[mask4.expand_as(original)])
    assert sg.kept_connections() == int(keep[group].sum()) * 9
    assert sg.pruned_fraction() == pytest.approx(1 - keep[group].float().mean().item())


def test_forward_ignores_pruned_weights():
    sg = SGConv2d.from_dense(_conv())
    group, keep = _random_structure(8, 6, 3, seed=1)
    sg.set_structure(group, keep)
    x = torch.randn(2, 6, 9, 9)
    expected = F.conv2d(x, sg.weight.detach() * keep[group][:, :, None, None].float(), sg.bias)
    with torch.no_grad():       # an optimiser writes large values into pruned positions
        pruned = ~sg.mask[:, :, None, None].expand_as(sg.weight)
        sg.weight[pruned] = 1e3
    out = sg(x)
    assert torch.allclose(out, expected, atol=1e-5)
    # and a manual computation with the dense weights would differ
    assert not torch.allclose(F.conv2d(x, sg.weight, sg.bias), expected, atol=1e-2)


def test_linear_forward_ignores_pruned_weights():
    torch.manual_seed(0)
    sg = SGLinear.from_dense(nn.Linear(6, 8))
    group, keep = _random_structure(8, 6, 4, seed=2)
    sg.set_structure(group, keep)
    with torch.no_grad():
        sg.weight[~sg.mask] = -50.0
    x = torch.randn(5, 6)
    expected = x @ (sg.weight.detach() * keep[group].float()).T + sg.bias
    assert torch.allclose(sg(x), expected, atol=1e-5)


def test_forward_ignores_nonfinite_pruned_weights():
    sg = SGConv2d.from_dense(_conv())
    group, keep = _random_structure(8, 6, 3, seed=1)
    sg.set_structure(group, keep)
    with torch.no_grad():
        sg.weight[~sg.mask[:, :, None, None].expand_as(sg.weight)] = float("inf")
    assert bool(torch.isfinite(sg(torch.randn(1, 6, 9, 9))).all())


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_pruned_weights_get_zero_gradient(kind):
    torch.manual_seed(0)
    if kind == "conv":
        sg, x = SGConv2d.from_dense(_conv()), torch.randn(2, 6, 9, 9)
        c_out, c_in = 8, 6
    else:
        sg, x = SGLinear.from_dense(nn.Linear(6, 8)), torch.randn(4, 6)
        c_out, c_in = 8, 6
    group, keep = _random_structure(c_out, c_in, 3, seed=3)
    sg.set_structure(group, keep)
    sg(x).pow(2).sum().backward()
    grad = sg.weight.grad
    view = sg.mask.view(sg.mask.shape + (1,) * (grad.dim() - 2)).expand_as(grad)
    assert bool((grad[~view] == 0).all())
    assert float(grad[view].abs().sum()) > 0        # kept weights do learn


def test_set_structure_rejects_bad_shapes():
    sg = SGConv2d.from_dense(_conv())
    with pytest.raises(ValueError):
        sg.set_structure(torch.zeros(7, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError):
        sg.set_structure(torch.zeros(8, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError):   # label 2 but only 2 keep rows
        sg.set_structure(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.ones(2, 6, dtype=torch.bool))
    assert bool(sg.mask.all())        # nothing installed by the failed calls


def test_check_invariant_detects_diverging_group_members():
    sg = SGConv2d.from_dense(_conv())
    group = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[0, :3] = False
    sg.set_structure(group, keep)
    assert sg.check_invariant()
    with torch.no_grad():
        sg.mask[1, 4] = False        # filter 1 (group 0) now differs from filter 0
    assert not sg.check_invariant()
