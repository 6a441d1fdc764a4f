"""Tests the dense parts of a fast-deployed model (sgdet.deploy.dense_parts): a dense conv with its
BN folded in equals conv + BN in eval mode, follows weight and statistic changes, trains as the
plain pair; the channels_last max-pool equals nn.MaxPool2d, at a stem and elsewhere; optimize()
folds the stems and shortcuts of ResNets and DenseNets, the outputs stay those of the masked
model, and checkpoints keep the new modules."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sgdet
from sgdet.deploy import ChannelsLastMaxPool2d, FoldedBatchNorm2d, FoldedConv2d
from sgdet.deploy.dense_parts import fold_dense_convs, pool_stems_channels_last, pools_channels_last
from sgdet.deploy.optimize import capture_inputs, optimize
from sgdet.deploy.patterns import dense_conv_bn_pairs, stem_pools

from conftest import assert_same_output, make_bottleneck_resnet, make_densenet, make_resnet18, randomize_bn


def _conv_bn(stride=2, bias=False, seed=0):
    torch.manual_seed(seed)
    pair = nn.Sequential(nn.Conv2d(5, 7, 3, stride, 1, bias=bias), nn.BatchNorm2d(7))
    return randomize_bn(pair).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_folded_conv_equals_conv_then_bn(bias):
    pair = _conv_bn(bias=bias)
    reference = copy.deepcopy(pair)
    assert fold_dense_convs(pair) == ["0"]
    assert isinstance(pair[0], FoldedConv2d) and isinstance(pair[1], FoldedBatchNorm2d)
    assert pair[1]._conv is pair[0] and pair[0]._folded_bn is pair[1]
    x = torch.randn(3, 5, 11, 9)
    with torch.no_grad():
        assert pair[0].folds(pair[1])
        assert_same_output(pair[0](x), reference(x))           # the conv alone applies the BN
        assert torch.equal(pair[1](x), x)                       # and the BN passes through
        assert_same_output(pair(x), reference(x))
    assert pair.state_dict().keys() == reference.state_dict().keys()


def test_folded_conv_follows_changes_and_trains_as_the_plain_pair():
    pair, reference = _conv_bn(), None
    reference = copy.deepcopy(pair)
    fold_dense_convs(pair)
    x = torch.randn(2, 5, 8, 8)
    with torch.no_grad():
        pair(x)
        for model in (pair, reference):                       # new statistics and weights, in place
            model[1].running_var.mul_(3.0)
            model[0].weight.add_(0.5)
        assert_same_output(pair(x), reference(x))
    pair.train(), reference.train()
    assert not pair[0].folds(pair[1])
    y, y_ref = pair(x), reference(x)                          # batch statistics, autograd
    assert_same_output(y, y_ref)
    y.square().sum().backward(), y_ref.square().sum().backward()
    assert_same_output(pair[0].weight.grad, reference[0].weight.grad)
    pair.eval(), reference.eval()
    with torch.no_grad():                                     # running stats moved in training
        assert_same_output(pair(x), reference(x))


def test_channels_last_max_pool_equals_max_pool():
    pool = nn.MaxPool2d(3, 2, 1)
    fast = ChannelsLastMaxPool2d.from_pool(pool)
    x = torch.randn(2, 6, 13, 10)
    y = fast(x)
    assert torch.equal(y, pool(x)) and y.is_contiguous()
    assert torch.equal(fast(x.contiguous(memory_format=torch.channels_last)), pool(x))


def test_patterns_find_resnet_and_densenet_stems_and_shortcuts():
    resnet, densenet = make_bottleneck_resnet(), make_densenet()
    assert ("conv1", "bn1") in dense_conv_bn_pairs(resnet)
    assert ("layer1.0.downsample.0", "layer1.0.downsample.1") in dense_conv_bn_pairs(resnet)
    assert stem_pools(resnet) == [("conv1", "maxpool")]
    assert ("features.conv0", "features.norm0") in dense_conv_bn_pairs(densenet)
    assert stem_pools(densenet) == [("features.conv0", "features.pool0")]
    relu_between = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    assert dense_conv_bn_pairs(relu_between) == []            # a BN after a ReLU does not fold


@pytest.mark.parametrize("build", [make_resnet18, make_densenet], ids=["resnet18", "densenet"])
def test_channels_last_stem_is_exact(build):
    model = randomize_bn(build()).eval()
    reference = copy.deepcopy(model)
    fold_dense_convs(model)
    x = torch.randn(2, 3, 40, 40)
    stems = capture_inputs(model, x, (FoldedConv2d,))
    # a margin of -100 accepts channels_last unless it is 100x slower: the transform is under test
    moved = pool_stems_channels_last(model, stems, repeats=1, margin=-100.0)
    assert len(moved) == 1 and isinstance(model.get_submodule(moved[0]), ChannelsLastMaxPool2d)
    with torch.no_grad():
        assert_same_output(model(x), reference(x))


def test_plain_max_pools_move_to_channels_last(tmp_path):
    """Max-pools outside a stem (LeNet-5's, after convs without BN) run in channels_last,
    converted in and out, where timed faster (forced here by a margin of -100: the transform is
    under test); the outputs stay the same, a pool returning indices or with no captured input
    is left alone, and a deployed checkpoint keeps the moved pools."""
    torch.manual_seed(0)
    model = sgdet.build("lenet5")
    sgdet.compress(model, conv_ratio=0.8, fc_ratio=0.8, groups=4, step=None)
    fast = sgdet.deploy(model.eval()).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        reference = fast(x)
    pools = capture_inputs(fast, x, (nn.MaxPool2d,))
    assert sorted(pools) == ["features.2", "features.5"]
    moved = pools_channels_last(fast, pools, repeats=1, margin=-100.0)
    assert moved == ["features.2", "features.5"]
    assert all(type(fast.get_submodule(n)) is ChannelsLastMaxPool2d for n in moved)
    with torch.no_grad():
        out = fast(x)
        assert out.is_contiguous()
        assert_same_output(out, reference)
    path = tmp_path / "lenet.sg.pt"
    sgdet.save(fast, path)
    loaded = sgdet.load(path).eval()
    assert [n for n, m in loaded.named_modules() if type(m) is ChannelsLastMaxPool2d] == moved
    with torch.no_grad():
        assert_same_output(loaded(x), reference)

    odd = nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(2, return_indices=True))
    y = torch.randn(2, 5, 11, 11)
    inputs = {"0": y, "1": nn.functional.max_pool2d(y, 3, 2, 1, ceil_mode=True)}
    assert pools_channels_last(odd, inputs, repeats=1, margin=-100.0) == ["0"]
    assert type(odd[1]) is nn.MaxPool2d
    assert pools_channels_last(nn.Sequential(nn.MaxPool2d(2)), {}, repeats=1, margin=-100.0) == []
    with torch.no_grad():
        assert_same_output(odd[0](y), nn.functional.max_pool2d(y, 3, 2, 1, ceil_mode=True))


@pytest.mark.parametrize("build,backend", [(make_bottleneck_resnet, "torch"), (make_densenet, "torch"),
                                           (make_bottleneck_resnet, "auto")],
                         ids=["bottleneck-torch", "densenet-torch", "bottleneck-auto"])
def test_optimize_folds_the_dense_parts(build, backend, tmp_path):
    model = randomize_bn(build())
    sgdet.compress(model, conv_ratio=0.7, fc_ratio=0.6, groups=8, step=None)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    fast = sgdet.deploy(model).eval()
    report = optimize(fast, x, repeats=1, verify=False, backend=backend)
    pairs = dense_conv_bn_pairs(model)            # the masked model's dense conv -> BN pairs
    assert pairs
    for conv_name, bn_name in pairs:              # each folds: through its weights, or natively
        conv, bn = fast.get_submodule(conv_name), fast.get_submodule(bn_name)
        assert isinstance(bn, FoldedBatchNorm2d) and bn._conv is conv
        assert isinstance(conv, FoldedConv2d) == (conv_name in report["folded_dense_convs"])
        assert conv_name in report["folded_dense_convs"] + report.get("native_dense_convs", [])
    if backend == "torch":
        assert report["folded_dense_convs"] == [c for c, _ in pairs]
    with torch.no_grad():
        assert_same_output(fast(x), model(x), rel=1e-4)
    path = tmp_path / "fast.sg.pt"
    sgdet.save(fast, path)
    loaded = sgdet.load(path, model=build()).eval()
    for conv_name in report["folded_dense_convs"]:
        assert type(loaded.get_submodule(conv_name)) is FoldedConv2d
        assert loaded.get_submodule(conv_name).channels_last == fast.get_submodule(conv_name).channels_last
    with torch.no_grad():
        assert_same_output(loaded(x), fast(x), rel=1e-5)


def test_folded_dense_convs_compile_and_export_without_an_eager_call():
    """Traced graphs fold in the graph (tensor versions are not traceable), so a model deployed
    without an example input compiles and exports at once, and follows later weight changes."""
    model = randomize_bn(make_bottleneck_resnet())
    sgdet.compress(model, conv_ratio=0.7, fc_ratio=0.6, groups=8, step=None)
    model.eval()
    fast = sgdet.deploy(model, optimize=True, backend="torch").eval()
    assert fast.sgdet_fast_report["folded_dense_convs"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_output(torch.compile(fast, backend="aot_eager")(x), model(x), rel=1e-4)
        exported = torch.export.export(fast, (x,))
        assert_same_output(exported.module()(x), model(x), rel=1e-4)
