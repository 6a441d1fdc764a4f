"""Tests the self-grouping schedule sgdet.compress (Algorithm 1): layer choice, steps, hooks, errors."""
from __future__ import annotations

import copy
import logging
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import sgdet
from sgdet import ConfigError, NumericalError, SGConv2d, SGLinear

from conftest import exact_pruned, make_lenet, make_resnet18


def _sg(model):
    return sgdet.sg_layers(model)


def _structure(model):
    return {n: (m.group.clone(), m.mask.clone()) for n, m in _sg(model).items()}


def _bound(layer) -> float:
    """Half the largest step of Eq. 13 for the layer's current grouping."""
    c_out, c_in = layer.mask.shape
    return int(layer.group_sizes().max()) / (2 * c_out * c_in)


def _conn_fraction(layers) -> float:
    layers = list(layers)
    return 1 - sum(int(m.mask.sum()) for m in layers) / sum(m.mask.numel() for m in layers)


# ---------------------------------------------------------------------------- which layers

def test_lenet_first_conv_stays_dense():
    model = make_lenet()
    first = model.features[0].weight.detach().clone()
    sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.5, groups=4, step=None)
    assert type(model.features[0]) is nn.Conv2d
    assert torch.equal(model.features[0].weight, first)
    assert isinstance(model.features[3], SGConv2d)
    assert isinstance(model.classifier[1], SGLinear) and isinstance(model.classifier[3], SGLinear)
    assert sorted(_sg(model)) == ["classifier.1", "classifier.3", "features.3"]


@pytest.fixture(scope="module")
def resnet18_compressed():
    model = make_resnet18()
    records = sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.3, groups=16, step=None)
    return model, records


def test_resnet18_first_and_downsample_convs_stay_dense(resnet18_compressed):
    model, records = resnet18_compressed
    assert len(records) == 1
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    dense = sorted(n for n, m in convs.items() if type(m) is nn.Conv2d)
    assert dense == ["conv1", "layer2.0.downsample.0", "layer3.0.downsample.0",
                     "layer4.0.downsample.0"]
    assert all(isinstance(m, SGConv2d) for n, m in convs.items() if n not in dense)
    assert len(convs) - len(dense) == 16
    assert isinstance(model.fc, SGLinear)
    for name, layer in _sg(model).items():
        assert layer.check_invariant(), name
        assert 0 < layer.pruned_fraction() < 1
    assert set(records[0].layers) == set(_sg(model))
    # separate conv and FC targets, each reached up to the grouping's granularity
    rec = records[0]
    assert (rec.conv_target, rec.fc_target) == (0.5, 0.3)
    assert abs(rec.conv_pruned - 0.5) < 0.01
    assert abs(exact_pruned(model.fc) - 0.3) <= _bound(model.fc) + 1e-9
    assert rec.fc_pruned == pytest.approx(model.fc.pruned_fraction())
    convs = [m for m in _sg(model).values() if isinstance(m, SGConv2d)]
    assert rec.conv_pruned == pytest.approx(_conn_fraction(convs))
    for name, layer in _sg(model).items():
        target = 0.5 if isinstance(layer, SGConv2d) else 0.3
        assert abs(exact_pruned(layer) - target) <= _bound(layer) + 1e-9, name


def test_include_and_exclude_patterns_override_defaults():
    base = make_resnet18()
    names = lambda **kw: {n for n, _ in sgdet.compressible_layers(base, **kw)}
    default = names()
    assert "conv1" not in default and not any("downsample" in n for n in default)
    assert "fc" in default and "layer1.0.conv1" in default
    assert names(include=["conv1"]) == default | {"conv1"}
    with_ds = names(exclude=[])
    assert with_ds == default | {"layer2.0.downsample.0", "layer3.0.downsample.0",
                                 "layer4.0.downsample.0"}
    no_l4 = names(exclude=["layer4*"])          # replaces the default, so downsample comes back
    assert not any(n.startswith("layer4") for n in no_l4)
    assert "layer3.0.downsample.0" in no_l4
    assert names(include=["*downsample*"], exclude=["*downsample*"]) >= {"layer2.0.downsample.0"}

    model = copy.deepcopy(base)
    sgdet.compress(model, conv_ratio=0.3, fc_ratio=0.0, groups=16, step=None,
                   include=["conv1"], exclude=["layer4*", "fc"])
    assert isinstance(model.conv1, SGConv2d)
    assert isinstance(model.layer2[0].downsample[0], SGConv2d)
    assert type(model.layer4[0].conv1) is nn.Conv2d and type(model.layer4[0].downsample[0]) is nn.Conv2d
    assert type(model.fc) is nn.Linear


def test_grouped_and_depthwise_convs_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, groups=4), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 10))
    dw, gc = model[2].weight.detach().clone(), model[4].weight.detach().clone()
    sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.5, groups=2, step=None, include=["*"])
    assert type(model[2]) is nn.Conv2d and type(model[4]) is nn.Conv2d
    assert torch.equal(model[2].weight, dw) and torch.equal(model[4].weight, gc)
    assert isinstance(model[0], SGConv2d)      # include=["*"] forces the first conv
    assert isinstance(model[3], SGConv2d) and isinstance(model[6], SGLinear)
    assert model(torch.randn(1, 3, 10, 10)).shape == (1, 10)


# ---------------------------------------------------------------------------- the schedule

def _expected_steps(goal, step):
    if step is None or goal == 0 or step >= goal:
        return 1
    return math.ceil(Fraction(str(goal)) / Fraction(str(step)))


@pytest.mark.parametrize("ratio,step", [(0.9, 0.1), (0.6, 0.1), (0.7, 0.1), (0.5, 0.2),
                                        (0.3, 0.3), (0.5, None), (0.5, 0.7), (0.0, 0.1),
                                        (0.45, 0.15), (0.27, 0.09), (0.54, 0.18)])
def test_number_of_steps_and_targets(ratio, step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 6))
    records = sgdet.compress(model, conv_ratio=ratio, fc_ratio=ratio, groups=2, step=step)
    n = _expected_steps(ratio, step)
    assert [r.step for r in records] == list(range(1, n + 1))
    s = ratio if step is None else step
    for r in records:
        expected = min(r.step * s, ratio)
        assert r.conv_target == pytest.approx(expected, abs=1e-9)
        assert r.fc_target == pytest.approx(expected, abs=1e-9)
        assert r.conv_target <= ratio
    assert records[-1].conv_target == pytest.approx(ratio)


def test_step_records_track_targets_per_layer():
    model = make_lenet()
    snapshots = []

    def hook(m, t):
        assert m is model
        snapshots.append({n: (exact_pruned(l), _bound(l), l.num_groups, l.check_invariant())
                          for n, l in _sg(m).items()})

    records = sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.3, groups=4, step=0.2,
                             finetune=hook)
    assert len(records) == 3 == len(snapshots)
    assert [r.conv_target for r in records] == pytest.approx([0.2, 0.4, 0.6])
    assert [r.fc_target for r in records] == pytest.approx([0.2, 0.3, 0.3])
    for rec, snap in zip(records, snapshots):
        for name, (pruned, bound, groups, ok) in snap.items():
            target = rec.conv_target if name.startswith("features") else rec.fc_target
            assert ok, name
            assert abs(pruned - target) <= bound + 1e-9, (rec.step, name, pruned, target)
            assert rec.layers[name]["groups"] == groups
            assert rec.layers[name]["pruned"] == pytest.approx(pruned)
        assert abs(rec.conv_pruned - rec.conv_target) <= snap["features.3"][1] + 1e-9
        assert abs(rec.fc_pruned - rec.fc_target) <= 0.02
    layers = _sg(model)
    last = records[-1]
    assert last.conv_pruned == pytest.approx(_conn_fraction([layers["features.3"]]))
    assert last.fc_pruned == pytest.approx(_conn_fraction([layers["classifier.1"], layers["classifier.3"]]))
    assert last.network_pruned == pytest.approx(_conn_fraction(layers.values()))
    d = last.to_dict()
    assert d["step"] == 3 and set(d["layers"]) == set(layers)


def test_finetune_hook_cannot_revive_pruned_weights():
    model = make_lenet()
    first_before = model.features[0].weight.detach().clone()
    calls = []

    def hook(m, t):
        calls.append(t)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)

    records = sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.6, groups=4, step=0.2,
                             finetune=hook)
    assert calls == [1, 2, 3] and len(records) == 3
    # the dense first conv was perturbed three times: the hook really ran on this model
    assert torch.allclose(model.features[0].weight, first_before + 3.0)
    for name, layer in _sg(model).items():
        w = layer.weight.detach()
        full = layer.mask.view(layer.mask.shape + (1,) * (w.dim() - 2)).expand_as(w)
        assert bool((w[~full] == 0).all()), name
        assert bool((w[full] != 0).all()), name   # kept weights were shifted by the hook
        assert layer.check_invariant()


def test_same_seed_same_structure_on_fresh_copies():
    base = make_lenet()
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    for m, seed in ((a, 5), (b, 5), (c, 6)):
        sgdet.compress(m, conv_ratio=0.7, fc_ratio=0.7, groups=8, step=None, seed=seed)
    sa, sb, sc = _structure(a), _structure(b), _structure(c)
    for name in sa:
        assert torch.equal(sa[name][0], sb[name][0]) and torch.equal(sa[name][1], sb[name][1])
    for name, m in _sg(a).items():
        assert torch.equal(m.weight, _sg(b)[name].weight)
    # the seed matters: another seed groups at least one layer differently
    assert any(not torch.equal(sa[n][0], sc[n][0]) for n in sa)


def test_compress_again_regroups_on_masked_weights():
    model = make_lenet()
    sgdet.compress(model, conv_ratio=0.4, fc_ratio=0.4, groups=4, step=None)
    fc = model.classifier[1]
    before = fc.pruned_fraction()
    sgdet.compress(model, conv_ratio=0.8, fc_ratio=0.8, groups=4, step=None)
    assert model.classifier[1] is fc                    # already-converted layers are kept
    assert fc.pruned_fraction() > before + 0.3
    assert abs(exact_pruned(fc) - 0.8) <= _bound(fc) + 1e-9


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs", [
    dict(conv_ratio=1.0), dict(conv_ratio=-0.1), dict(conv_ratio=float("nan")),
    dict(conv_ratio=float("inf")), dict(fc_ratio=1.0), dict(fc_ratio=float("nan")),
    dict(conv_ratio="0.5"), dict(groups=0), dict(groups=2.5), dict(groups=-3), dict(groups=True),
    dict(step=0.0), dict(step=-0.1), dict(step=1.5),
])
def test_bad_config_raises_config_error(kwargs):
    model = make_lenet()
    args = dict(conv_ratio=0.5, fc_ratio=0.5, groups=4, step=None)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        sgdet.compress(model, **args)
    assert isinstance(info.value, ValueError) and isinstance(info.value, sgdet.SGError)
    assert "\n" not in str(info.value)
    key = next(iter(kwargs))
    assert key in str(info.value)
    assert not _sg(model)                       # validated before anything is converted


def test_model_without_compressible_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError, match="no compressible"):
        sgdet.compress(model, 0.5, 0.5)


@pytest.mark.parametrize("kwargs", [dict(n_init=0), dict(seed=-1)])
def test_bad_kmeans_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        sgdet.compress(make_lenet(), conv_ratio=0.5, fc_ratio=0.5, groups=4, step=None, **kwargs)


@pytest.mark.parametrize("layer,value", [("features.3", float("nan")),
                                         ("classifier.1", float("inf")),
                                         ("classifier.3", float("-inf"))])
def test_nonfinite_weights_raise_numerical_error(layer, value):
    model = make_lenet()
    with torch.no_grad():
        model.get_submodule(layer).weight.view(-1)[7] = value
    with pytest.raises(NumericalError) as info:
        sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.5, groups=4, step=None)
    assert layer in str(info.value)
    assert isinstance(info.value, sgdet.SGError)


# ---------------------------------------------------------------------------- few filters

class _Narrow(nn.Module):
    """A model whose last layer has 3 outputs; the attribute name is unique to this test file so
    no other test in the session has warned about it before."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.body = nn.Conv2d(4, 12, 3)
        self.narrow_head_test_compress = nn.Linear(12, 3)

    def forward(self, x):
        return self.narrow_head_test_compress(self.body(self.stem(x)).mean((2, 3)))


def test_fewer_filters_than_groups_warns_once(caplog):
    torch.manual_seed(0)
    model = _Narrow()
    with caplog.at_level(logging.WARNING, logger="sgdet"):
        records = sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.5, groups=8, step=0.125)
    assert len(records) == 4
    hits = [r for r in caplog.records if "narrow_head_test_compress" in r.getMessage()]
    assert len(hits) == 1, [r.getMessage() for r in caplog.records]
    assert hits[0].levelno == logging.WARNING
    assert "3" in hits[0].getMessage() and "8" in hits[0].getMessage()
    head = model.narrow_head_test_compress
    assert head.num_groups == 3 and head.group.tolist() == [0, 1, 2]
    assert model.body.num_groups == 8


def test_fewer_filters_warning_repeats_for_a_new_model(caplog):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3)
            self.narrow_second_model_head = nn.Linear(4, 2)

        def forward(self, x):
            return self.narrow_second_model_head(self.stem(x).mean((2, 3)))

    torch.manual_seed(0)
    counts = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sgdet"):
            sgdet.compress(Other(), conv_ratio=0.5, fc_ratio=0.5, groups=4, step=None)
        counts.append(sum("narrow_second_model_head" in r.getMessage() for r in caplog.records))
    assert counts == [1, 1]
