"""Tests the fast deployment stage (sgdet.deploy.optimize, plans, patterns): every execution
plan is exact on random layer shapes, permutations are folded, dead channels are dropped, and the
fast model round-trips."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sgdet
from sgdet import DiverseGroupConv2d, DiverseGroupLinear, GatheredBatchNorm2d
from sgdet.deploy.optimize import _keep_if_faster, optimize, ungather_batchnorm
from sgdet.deploy.patterns import conv_bn_conv_chains, gathered_bn_pairs
from sgdet.deploy.plans import candidate_plans, choose_plan, dense_plan, loop_plan, merge_groups, plan_label

from conftest import assert_same_output, make_bottleneck_resnet, make_densenet, make_resnet18, randomize_bn


def _structured(layer, groups: int, seed: int):
    """Random grouping with a one-filter group, a group that keeps no input and unused labels."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = layer.mask.shape
    group = torch.randint(1, groups, (out_features,), generator=gen)
    group[0] = 0                                       # group 0 has exactly one filter
    group[group == groups - 1] = groups - 2 if groups > 3 else group[group == groups - 1]
    keep = torch.rand(groups, in_features, generator=gen) < 0.35
    keep[1] = False                                    # a group left without inputs by pruning
    layer.set_structure(group, keep)
    with torch.no_grad():
        layer.bias.normal_(generator=gen) if layer.bias is not None else None
    return layer


CONV_SHAPES = [  # (c_in, c_out, kernel, stride, padding, dilation, groups)
    (12, 20, 3, 1, 1, 1, 6),
    (16, 9, 1, 2, 0, 1, 5),
    (10, 24, 3, 2, 2, 2, 8),
    (7, 13, (3, 1), 1, (1, 0), 1, 4),
]


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_every_conv_plan_is_exact(shape):
    c_in, c_out, k, stride, pad, dil, groups = shape
    torch.manual_seed(sum(map(hash, map(str, shape))) % 1000)
    sg = _structured(sgdet.SGConv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil), groups, 3)
    dg = DiverseGroupConv2d.from_sg(sg).eval()
    assert 0 in dg.group_in and 1 in dg.group_out          # an empty group and a one-filter group
    x = torch.randn(3, c_in, 11, 9)
    with torch.no_grad():
        ref = sg(x)
        labels = set()
        for plan in candidate_plans(dg):
            dg.set_plan(plan)
            labels.add(plan_label(plan).split("-")[0])
            out = dg(x)
            assert_same_output(ref, out)
            # the count of what runs agrees with torch's FLOP counter
            with FlopCounterMode(display=False) as counter:
                y = dg(x)
            assert sgdet.counting._layer_macs(dg, (x,), y) == counter.get_total_flops() // 2
    assert labels >= {"per", "dense", "loop", "grouped"}


def test_every_linear_plan_is_exact():
    sg = _structured(sgdet.SGLinear(40, 30), 7, 5)
    dg = DiverseGroupLinear.from_sg(sg).eval()
    x = torch.randn(5, 40)
    with torch.no_grad():
        ref = sg(x)
        for plan in candidate_plans(dg):
            dg.set_plan(plan)
            assert_same_output(ref, dg(x))


def test_merge_groups_joins_the_most_similar_sets():
    sets = [0b0011, 0b0111, 0b1100_0000, 0b1110_0000, 0]
    assert merge_groups(sets, [2, 2, 2, 2, 3], 2) == [[0, 1, 4], [2, 3]]
    assert merge_groups(sets, [1] * 5, 5) == [[0], [1], [2], [3], [4]]
    assert merge_groups(sets, [1] * 5, 1) == [[0, 1, 2, 3, 4]]


def test_plan_is_trainable_and_resyncs_after_an_update():
    sg = _structured(sgdet.SGConv2d(8, 12, 3, padding=1), 4, 7)
    dg = DiverseGroupConv2d.from_sg(sg)
    groups = list(range(len(dg.group_out)))
    dg.set_plan(loop_plan([groups[:2], groups[2:]]))
    x = torch.randn(2, 8, 6, 6)
    dg.train()
    dg(x).sum().backward()                                # training runs the exact per-group form
    assert all(w.grad is not None for w in dg.weights if w.numel())
    torch.optim.SGD(dg.parameters(), lr=0.5).step()
    dg.eval()
    with torch.no_grad():
        fast = dg(x)                                      # the plan picks up the new weights
    with torch.enable_grad():
        exact = dg(x)
    assert_same_output(exact, fast)



@pytest.fixture(scope="module")
def compressed():
    models = {}
    for name, build, size in (("bottleneck", make_bottleneck_resnet, (3, 32, 32)),
                              ("basic", make_resnet18, (3, 32, 32)), ("densenet", make_densenet, (3, 32, 32))):
        model = randomize_bn(build())
        sgdet.compress(model, conv_ratio=0.9, fc_ratio=0.6, groups=16, step=None)
        models[name] = (model.eval(), size)
    return models


@pytest.mark.parametrize("name", ["bottleneck", "basic", "densenet"])
def test_folding_and_dead_channels_are_exact(name, compressed):
    model, size = compressed[name]
    x = torch.randn(2, *size)
    deployed = sgdet.deploy(model)
    chains = conv_bn_conv_chains(deployed)
    assert chains
    if name != "densenet":        # its 16-filter conv1s in 16 groups happen to need no reorder
        assert any(deployed.get_submodule(p).reorders_output for p, _, _ in chains)
    report = optimize(deployed, plans=False, align=1)       # every dead filter goes
    assert report["dropped_channels"] > 0
    for producer, bn, consumer in chains:                 # no standalone reorder left in a chain
        assert not deployed.get_submodule(producer).reorders_output
        if name == "densenet":
            assert isinstance(deployed.get_submodule(bn), GatheredBatchNorm2d)
    with torch.no_grad():
        assert_same_output(model(x), deployed(x))
    exact = sgdet.count(sgdet.deploy(model), size)
    fast = sgdet.count(deployed, size)
    assert fast["params"] < exact["params"] and fast["flops"] < exact["flops"]


@pytest.mark.parametrize("name", ["bottleneck", "basic", "densenet"])
def test_dead_channel_pass_keeps_aligned_filter_counts(name, compressed):
    model, size = compressed[name]
    x = torch.randn(2, *size)
    counts = {}
    for align in (1, 8):
        deployed = sgdet.deploy(model)
        before = {p: deployed.get_submodule(p).out_features_total for p, _, _ in conv_bn_conv_chains(deployed)}
        report = optimize(deployed, plans=False, align=align)
        after = {p: deployed.get_submodule(p).out_features_total for p in before}
        counts[align] = report["dropped_channels"]
        assert report["dropped_channels"] == sum(before[p] - after[p] for p in before)
        if align == 8:       # a multiple of 8 stays one (a 127-filter 1x1 conv runs slower than 128)
            assert all(after[p] % 8 == 0 for p in before if before[p] % 8 == 0)
        with torch.no_grad():
            assert_same_output(model(x), deployed(x))
    assert counts[1] > counts[8] >= 0
    assert counts[1] - counts[8] < 8 * len(before)        # at most 7 dead filters kept per producer


@pytest.mark.parametrize("name", ["bottleneck", "densenet"])
def test_optimized_model_is_exact_and_round_trips(name, compressed, tmp_path):
    model, size = compressed[name]
    x = torch.randn(2, *size)
    fast = sgdet.deploy(model, optimize=True, example_input=x, repeats=1)
    report = fast.sgdet_fast_report
    assert report["layers"] and all(len(v["candidates"]) >= 2 for v in report["layers"].values())
    with torch.no_grad():
        ref = model(x)
        assert_same_output(ref, fast(x))
        # loop and dense plans inside a chain emit their channels in the consumer's order
        for producer, _, _ in conv_bn_conv_chains(fast):
            layer = fast.get_submodule(producer)
            if layer.plan is not None and not plan_label(layer.plan).startswith("grouped"):
                assert not layer.plan_reorders_output, producer
    path = tmp_path / "fast.sg.pt"
    sgdet.save(fast, path)
    skeleton = make_bottleneck_resnet() if name == "bottleneck" else make_densenet()
    again = sgdet.load(path, model=skeleton).eval()
    plans = {n: m.plan for n, m in fast.named_modules() if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear))}
    assert plans == {n: m.plan for n, m in again.named_modules()
                     if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear))}
    with torch.no_grad():
        assert_same_output(ref, again(x))
    # counting follows what runs: FLOPs agree with torch's counter, params are the kept weights
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        again(x[:1])
    assert sgdet.count_flops(again, size) == counter.get_total_flops() // 2
    assert sgdet.count_params(again) == sum(p.numel() for p in again.parameters())


def test_cost_model_plans_without_an_example_are_exact(compressed):
    model, size = compressed["basic"]
    fast = sgdet.deploy(model, optimize=True)
    x = torch.randn(3, *size)
    with torch.no_grad():
        assert_same_output(model(x), fast(x))
    assert all(isinstance(v["candidates"]["dense"], float) for v in fast.sgdet_fast_report["layers"].values())


def test_optimize_refuses_a_masked_model(compressed):
    model, _ = compressed["basic"]
    with pytest.raises(sgdet.ConfigError):
        optimize(model)


def test_ungathering_every_batchnorm_is_exact_and_round_trips(compressed, tmp_path):
    model, size = compressed["densenet"]
    x = torch.randn(2, *size)
    fast = sgdet.deploy(model)
    optimize(fast, plans=False, ungather=False)
    pairs = gathered_bn_pairs(fast)
    assert pairs                                     # DenseNet's norm1s gather the channels conv1 reads
    for bn_name, conv_name in pairs:
        gathered = fast.get_submodule(bn_name)
        ungather_batchnorm(fast, bn_name, conv_name)
        full, conv = fast.get_submodule(bn_name), fast.get_submodule(conv_name)
        assert type(full) is torch.nn.BatchNorm2d and full.num_features == gathered.in_channels
        assert conv.in_channels == gathered.in_channels
    assert gathered_bn_pairs(fast) == []
    for layer in fast.modules():                     # then plans on top of the wider inputs
        if isinstance(layer, DiverseGroupConv2d):
            layer.set_plan(loop_plan([list(range(len(layer.weights)))]))
    with torch.no_grad():
        ref = model(x)
        assert_same_output(ref, fast(x))
    path = tmp_path / "ungathered.sg.pt"
    sgdet.save(fast, path)
    again = sgdet.load(path, model=make_densenet()).eval()
    with torch.no_grad():
        assert_same_output(ref, again(x))


def test_plan_choice_keeps_dense_unless_clearly_faster(compressed):
    model, size = compressed["bottleneck"]
    deployed = sgdet.deploy(model)
    layer = deployed.get_submodule("layer2.0.conv2")
    x = torch.randn(2, layer.in_channels, 8, 8)
    results = choose_plan(layer, x, repeats=1, margin=0.99)     # nothing is 100x faster than dense
    assert set(results) >= {"dense", "per-group"} and plan_label(layer.plan) == "dense"
    with pytest.raises(sgdet.ConfigError):
        optimize(deployed, margin=1.5)


def test_channels_last_example_tunes_a_channels_last_model(compressed):
    model, size = compressed["bottleneck"]
    x = torch.randn(2, *size).contiguous(memory_format=torch.channels_last)
    fast = sgdet.deploy(model, optimize=True, example_input=x, repeats=1)
    conv = fast.get_submodule("layer1.0.conv2")                   # a 3x3 conv
    assert conv.weights[0].is_contiguous(memory_format=torch.channels_last)
    for weight in conv.plan_weights:
        assert weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_same_output(model(x.contiguous()), fast(x))
        assert_same_output(model(x.contiguous()), fast(x.contiguous()))   # either layout runs


def test_gathers_keep_a_channels_last_map_channels_last(compressed):
    from sgdet.deploy.modules import select_channels
    x = torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    index = torch.tensor([5, 0, 0, 2])
    y = select_channels(x, 1, index)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x.contiguous()[:, index])
    model, size = compressed["densenet"]
    xd = torch.randn(2, *size).contiguous(memory_format=torch.channels_last)
    deployed = sgdet.deploy(model).to(memory_format=torch.channels_last).eval()
    outputs = []
    handles = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out))
               for m in deployed.modules() if isinstance(m, (GatheredBatchNorm2d, DiverseGroupConv2d))]
    with torch.no_grad():
        assert_same_output(model(xd.contiguous()), deployed(xd))
    for h in handles:
        h.remove()
    assert outputs and all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs)


def test_interleaved_timing_shuffles_the_order_of_every_round():
    from sgdet.deploy.timing import time_interleaved
    calls = []
    seconds = time_interleaved({n: (lambda n=n: calls.append(n)) for n in "abcd"}, repeats=8, warmup=0)
    rounds = ["".join(calls[i:i + 4]) for i in range(0, 32, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and set(seconds) == set("abcd")
    assert len(set(rounds)) > 2                                  # no fixed order
    followers = {r[r.index("a") + 1] for r in rounds if not r.endswith("a")}
    assert len(followers) > 1                                    # "a" is not always followed by one
    again = []
    time_interleaved({n: (lambda n=n: again.append(n)) for n in "abcd"}, repeats=8, warmup=0)
    assert again == calls                                        # seeded: the same order each run


def test_close_wins_are_timed_again_before_they_replace_dense():
    import time as clock

    from sgdet.deploy.timing import confirmed_win
    calls = []

    def sleeper(name, ms):
        return lambda: (calls.append(name), clock.sleep(ms / 1e3))

    quick, slow = sleeper("quick", 1), sleeper("slow", 10)
    # clear verdicts stand without another run
    assert confirmed_win(quick, slow, {"fast": 0.5, "dense": 1.0}, 0.05) == (True, {}) and not calls
    assert confirmed_win(quick, slow, {"fast": 0.97, "dense": 1.0}, 0.05) == (False, {}) and not calls
    # a close first win (0.9 < 0.95 but > 0.85) is re-timed, and the re-timing decides
    wins, again = confirmed_win(slow, quick, {"fast": 0.9, "dense": 1.0}, 0.05, repeats=1)
    assert not wins and again["fast"] > again["dense"] and calls.count("slow") >= 9
    wins, again = confirmed_win(quick, slow, {"fast": 0.9, "dense": 1.0}, 0.05, repeats=1)
    assert wins and again["fast"] < again["dense"]


def test_tuned_model_falls_back_to_dense_plans_unless_faster_whole(compressed):
    model, size = compressed["densenet"]
    x = torch.randn(2, *size)
    tuned = sgdet.deploy(model).eval()
    fallback = sgdet.deploy(model).eval()
    for layer in fallback.modules():
        if isinstance(layer, (DiverseGroupConv2d, DiverseGroupLinear)) and len(layer.weights):
            layer.set_plan(dense_plan(layer))
    report = {"layers": {}, "ungathered_norms": 0}
    for name, layer in tuned.named_modules():
        if isinstance(layer, (DiverseGroupConv2d, DiverseGroupLinear)) and len(layer.weights):
            layer.set_plan(candidate_plans(layer)[-1])                 # a merged, non-dense plan
            report["layers"][name] = {"plan": plan_label(layer.plan)}
    bn, conv = gathered_bn_pairs(tuned)[0]
    ungather_batchnorm(tuned, bn, conv)
    report["ungathered_norms"] = 1
    held = tuned                                                         # callers' reference
    verdict = _keep_if_faster(tuned, fallback, x, repeats=1, margin=0.99, report=report)
    assert verdict["kept"] is False and held is tuned                   # nothing is 100x faster
    assert all(entry["plan"] == "dense" for entry in report["layers"].values())
    assert report["ungathered_norms"] == 0 and isinstance(tuned.get_submodule(bn), GatheredBatchNorm2d)
    with torch.no_grad():
        assert_same_output(model(x), tuned(x))
    fast = sgdet.deploy(model).eval()
    assert gathered_bn_pairs(fast)
    report = optimize(fast, x, repeats=1, margin=0.99)           # the whole-model check must fail
    assert report["verified"]["kept"] is False and set(report["verified"]) == {"tuned_s", "dense_s", "kept"}
    # the fallback is the dense model's computation: no gathering BN, every layer on its dense plan
    assert report["ungathered_norms"] > 0 and not gathered_bn_pairs(fast)
    assert all(plan_label(m.plan) == "dense" for m in fast.modules()
               if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear)) and len(m.weights))
    with torch.no_grad():
        assert_same_output(model(x), fast(x))


def test_deploying_a_channels_last_model_keeps_its_weights_channels_last(compressed):
    model, size = compressed["bottleneck"]
    deployed = sgdet.deploy(copy_channels_last(model)).eval()
    conv = deployed.get_submodule("layer1.0.conv2")                   # a 3x3 conv, no optimize()
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv.weights)
    conv.set_plan(dense_plan(conv))          # else each call would convert the weight again
    assert conv.plan_weights[0].is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_same_output(model(x.contiguous()), deployed(x))


def copy_channels_last(model):
    import copy
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


REGISTER_FIRST = r"""
import sys
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
sys.path.insert(0, {tests!r})
import sgdet
from sgdet.deploy import register_conv_bn_conv
from conftest import make_resnet18, randomize_bn


class MyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(self.bn(self.a(x)).relu())


register_conv_bn_conv(MyBlock, [("a", "bn", "b")])      # before any optimize() ran
model = randomize_bn(make_resnet18())
sgdet.compress(model, conv_ratio=0.9, fc_ratio=0.6, groups=16, step=None)
model.eval()
conv1s = [n + ".conv1" for n, m in model.named_modules() if isinstance(m, BasicBlock)]
exact = sgdet.deploy(model)
assert any(exact.get_submodule(n).reorders_output for n in conv1s), "nothing to fold: proves nothing"
fast = sgdet.deploy(model, optimize=True)
unfolded = [n for n in conv1s if fast.get_submodule(n).reorders_output]
assert not unfolded, f"built-in BasicBlock chains lost: {{unfolded}}"
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    assert torch.allclose(model(x), fast(x), rtol=1e-4, atol=1e-4)
"""


def test_registering_a_chain_first_keeps_the_builtin_chains():
    """A user's register_conv_bn_conv before the first optimize() must add to the torchvision
    chains, not replace them (a fresh process: the registries are process-wide)."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", REGISTER_FIRST.format(tests=tests)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]


def test_old_module_names_still_work():
    """sgdet.fast (the README's name) re-exports the fast stage's public names."""
    import sgdet.fast as fast
    from sgdet.deploy import optimize as optimize_fn
    from sgdet.deploy.optimize import capture_inputs
    from sgdet.deploy.patterns import CONV_BN_CONV_CHAINS, register_conv_bn_conv
    from sgdet.deploy.timing import time_interleaved
    assert fast.optimize is optimize is optimize_fn
    assert fast.register_conv_bn_conv is register_conv_bn_conv
    assert fast.CONV_BN_CONV_CHAINS is CONV_BN_CONV_CHAINS
    assert fast.time_interleaved is time_interleaved and fast.capture_inputs is capture_inputs
