"""Tests params/FLOPs counting (sgdet.count) of dense, masked and deployed models, incl. Table 3,
under both conventions: sgdet's (default) and the paper's (the authors' counter)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sgdet
from sgdet.cli import main
from sgdet.counting import format_count

from conftest import (dropped_inputs, empty_groups, make_bottleneck_resnet, make_densenet, make_lenet,
                      make_resnet18, seed_all)

# one intra-op thread: k-means and the 224 px forward passes run several times faster on a shared
# 2-core machine than with two threads spinning against other processes
pytestmark = pytest.mark.usefixtures("one_thread")


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
    paper = sgdet.count(model, convention="paper")      # the authors' counter: closer still
    assert abs(paper["params"] - params) / params < 0.005, paper
    assert abs(paper["flops"] - flops) / flops < 0.015, paper
    assert paper["flops"] == c["flops"]                   # a masked model's MACs agree
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


# ------------------------------------------------------------------ the paper's convention

def _paper_by_hand(model: nn.Module) -> int:
    """The authors' rules on a dense torchvision model, independently of sgdet's code: every conv
    but the first and ResNet's downsample convs counts its weights plus 2 per output channel (its
    BatchNorm's stand-in), the first conv and downsample convs their weights, the FC its weights;
    no real BatchNorm, no FC bias."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    total = 0
    for i, (name, conv) in enumerate(convs):
        masked = i > 0 and "downsample" not in name
        total += conv.weight.numel() + (2 * conv.out_channels if masked else 0)
    return total + sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.fixture(scope="module")
def densenet201_base():
    seed_all(0)
    return torchvision.models.densenet201()


def test_paper_baselines_exact(resnet50_base, densenet201_base):
    dn = sgdet.count(densenet201_base, convention="paper")
    assert dn == {"params": 19_817_792, "flops": 4_291_365_888}
    assert (format_count(dn["params"]), format_count(dn["flops"])) == ("19.82M", "4.29G")  # Table 4
    rn = sgdet.count(resnet50_base, convention="paper")
    assert rn == {"params": 25_548_224, "flops": 4_089_184_256}
    assert (format_count(rn["params"]), format_count(rn["flops"])) == ("25.55M", "4.09G")  # Table 3
    for model, counts in ((densenet201_base, dn), (resnet50_base, rn)):
        assert counts["params"] == _paper_by_hand(model)
        assert counts["flops"] == sgdet.count_flops(model)     # conv + FC MACs in both conventions
    # sgdet's default counts the real BatchNorms: it cannot give the DenseNet baseline
    assert format_count(sgdet.count_params(densenet201_base)) == "20.01M"
    assert format_count(sgdet.count_params(resnet50_base)) == "25.56M"


# (conv ratio, paper params, paper FLOPs, params bound, FLOPs bound): the paper's DenseNet rows
# are not a uniform per-layer prune. Conv-70 has 70.9 % of the masked conv weights pruned, not 70
# (their percentile threshold prunes every tie too), so ours is 2.8 % (params) and 2.2 % (FLOPs)
# above; Conv-80's FLOPs keep 20.9 % of the masked MACs while its params keep 19.7 %, so more
# survived in the high-resolution layers than a per-layer ratio keeps: ours is 3.7 % below.
DENSENET201_ROWS = [(0.7, 6.00e6, 1.34e9, 0.030, 0.025),
                    (0.8, 4.32e6, 0.99e9, 0.015, 0.040)]


@pytest.mark.parametrize("conv_ratio,params,flops,params_bound,flops_bound", DENSENET201_ROWS,
                         ids=["conv70", "conv80"])
def test_paper_table4_densenet201(densenet201_base, conv_ratio, params, flops, params_bound, flops_bound):
    model = copy.deepcopy(densenet201_base)
    sgdet.compress(model, conv_ratio=conv_ratio, fc_ratio=0.6, groups=16, step=None)
    c = sgdet.count(model, convention="paper")
    assert abs(c["params"] - params) / params < params_bound, c
    assert abs(c["flops"] - flops) / flops < flops_bound, c
    # the rows follow from the rules: first conv dense, masked convs and the FC at their ratios
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    first, fc = convs[0], model.classifier
    kept_conv = sum(m.kept_connections() for m in convs[1:])
    live = sum(int(m.mask.any(1).sum()) for m in convs[1:])
    assert c["params"] == first.weight.numel() + kept_conv + 2 * live + fc.kept_connections()
    assert abs(kept_conv / sum(m.weight.numel() for m in convs[1:]) - (1 - conv_ratio)) < 0.002


def test_paper_lenet_conv95_fixes_the_fc_rule():
    """LeNet-5 Conv-95/FC-95 at the nominal ratio (one kept conv2 input per filter, so every
    filter is live: nothing ambiguous) is the paper's 22K / 388K only without FC biases: with them
    it is 22.63K, '23K' under the paper's half-up rounding (ResNet50's 25.548M is its 25.55M)."""
    model = make_lenet()
    layers = sgdet.convert(model)
    for layer in layers.values():                  # one group per filter, kept entries dealt round-robin
        c_out, c_in = layer.mask.shape
        keep = torch.zeros(c_in, c_out, dtype=torch.bool)
        keep.view(-1)[:round(0.05 * c_out * c_in)] = True
        layer.set_structure(torch.arange(c_out), keep.t())
    assert all(bool(m.mask.any(1).all()) for m in layers.values())
    c = sgdet.count(model, (1, 28, 28), convention="paper")
    # conv1 dense (500 + 20 bias), conv2 50 entries * 25 + 2 * 50, fc1 20000, fc2 250
    assert c == {"params": 520 + 1250 + 100 + 20_000 + 250, "flops": 388_250}
    assert (format_count(c["params"], "K"), format_count(c["flops"], "K")) == ("22K", "388K")
    fc_biases = sum(m.bias.numel() for m in layers.values() if isinstance(m, sgdet.SGLinear))
    assert format_count(c["params"] + fc_biases, "K") == "23K"


def test_paper_rules_by_hand_with_an_empty_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), sgdet.SGConv2d(6, 8, 3),
                          nn.BatchNorm2d(8), nn.Flatten(), sgdet.SGLinear(8 * 12 * 12, 4))
    group = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    keep = torch.tensor([[False] * 6, [True, False, True, False, False, False], [True] * 6])
    model[2].set_structure(group, keep)
    model[5].set_structure(torch.tensor([0, 0, 1, 1]), torch.arange(8 * 144).remainder(3).eq(0).repeat(2, 1))
    kept_fc = 4 * 384
    # first conv dense (weights + bias), no BN, masked conv: 24 mask entries * 9 + 2 * 6 live
    # filters (group 0 kept nothing), FC: kept weights only
    params = 3 * 6 * 9 + 6 + 24 * 9 + 2 * 6 + kept_fc
    flops = 14 * 14 * 6 * 27 + 12 * 12 * 24 * 9 + kept_fc
    c = sgdet.count(model, (3, 16, 16), convention="paper")
    assert c == {"params": params, "flops": flops}
    assert sgdet.count(sgdet.deploy(model), (3, 16, 16), convention="paper") == c


@pytest.mark.parametrize("name,build,size", [
    ("lenet5", make_lenet, (1, 28, 28)),
    ("resnet18", make_resnet18, (3, 64, 64)),
    ("bottleneck", make_bottleneck_resnet, (3, 64, 64)),
    ("densenet", make_densenet, (3, 32, 32)),
])
def test_paper_deployed_equals_masked(name, build, size):
    from sgdet.deploy.optimize import optimize
    model = build()
    dense = sgdet.count(model, size, convention="paper")
    sgdet.compress(model, conv_ratio=0.0, fc_ratio=0.0, groups=4, step=None)
    assert sgdet.count(model, size, convention="paper") == dense    # a baseline is its unpruned masked form
    sgdet.compress(model, conv_ratio=0.7, fc_ratio=0.7, groups=8, step=None)
    masked = sgdet.count(model, size, convention="paper")
    assert masked["params"] < dense["params"] and masked["flops"] < dense["flops"]
    deployed = sgdet.deploy(model)
    assert sgdet.count(deployed, size, convention="paper") == masked, name
    # execution plans (zero-filled buckets, dense forms) change what runs, not the paper count
    optimize(deployed, dead_channels=False)
    assert sgdet.count(deployed, size, convention="paper") == masked, name


def test_unknown_convention_is_one_line():
    for call in (lambda: sgdet.count(make_lenet(), (1, 28, 28), convention="torchsummary"),
                 lambda: sgdet.count_params(make_lenet(), "Paper")):
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, sgdet.ConfigError)
        message = str(info.value)
        assert "\n" not in message and "sgdet, paper" in message


def test_cli_convention(tmp_path, capsys):
    out, deployed = tmp_path / "lenet.sg.pt", tmp_path / "lenet.dep.sg.pt"
    assert main(["compress", "--arch", "lenet5", "--conv-ratio", "0.9", "--fc-ratio", "0.9",
                 "--groups", "4", "--out", str(out), "--json", "--convention", "paper"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["convention"] == "paper"
    base, comp = report["rows"]
    assert base["params"] == 430_620 and base["flops"] == 2_293_000     # no FC or conv2 bias
    model = sgdet.load(out)
    assert sgdet.count(model, (1, 28, 28), convention="paper") == {"params": comp["params"], "flops": comp["flops"]}
    assert model.sgdet_meta["counts"]["convention"] == "paper"
    assert main(["info", str(out), "--json", "--convention", "paper"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"params": comp["params"], "flops": comp["flops"]}
    assert main(["deploy", str(out), "--out", str(deployed), "--json", "--convention", "paper"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"params": comp["params"], "flops": comp["flops"]}
    assert main(["info", str(deployed), "--convention", "paper"]) == 0
    text = capsys.readouterr().out
    assert f"({comp['params']})" in text and "(paper convention)" in text
    for verb in (["info", str(out)], ["deploy", str(out), "--out", str(tmp_path / "x.sg.pt")]):
        assert main([*verb, "--convention", "torchsummary"]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "unknown counting convention 'torchsummary'" in lines[0]
    assert not (tmp_path / "x.sg.pt").exists()


def test_pipeline_config_convention():
    from classification.config import get_defaults, validate_config
    from sgdet.detection.config import get_defaults as detection_defaults
    cfg = get_defaults()
    assert cfg.COUNT.CONVENTION == "sgdet" and detection_defaults().TEST.COUNT_CONVENTION == "sgdet"
    cfg.COUNT.CONVENTION = "paper"
    validate_config(cfg)
    cfg.COUNT.CONVENTION = "torchsummary"
    with pytest.raises(sgdet.ConfigError, match="COUNT.CONVENTION must be one of sgdet, paper"):
        validate_config(cfg)


def test_classification_eval_reports_by_config_convention(tmp_path):
    """`python -m classification eval ... COUNT.CONVENTION paper`: results and metrics count the
    paper's way (the Trainer's one counter)."""
    from classification.__main__ import main as classification_main
    from test_engine import make_imagefolder, read_metrics, write_config
    config = write_config(str(tmp_path / "tiny.yaml"), make_imagefolder(str(tmp_path / "data")),
                          str(tmp_path / "unused"))
    seed_all(0)
    model = sgdet.build("lenet5", num_classes=4, in_channels=3)     # the tiny data's RGB images
    sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.5, groups=4, step=None)
    weights = str(tmp_path / "lenet.sg.pt")
    sgdet.save(model, weights)
    params = {}
    for convention in ("sgdet", "paper"):
        out = str(tmp_path / convention)
        assert classification_main(["eval", "--config", config, "MODEL.WEIGHTS", weights,
                                    "OUTPUT_DIR", out, "COUNT.CONVENTION", convention]) == 0
        (record,) = read_metrics(out)
        expected = sgdet.count(sgdet.load(weights), (3, 28, 28), convention)
        assert (record["params"], record["flops"]) == (expected["params"], expected["flops"])
        params[convention] = record["params"]
    assert params["paper"] < params["sgdet"]          # no conv2/FC biases, 2 per live conv2 filter


def test_cli_export_counts_by_convention(tmp_path, capsys):
    out = tmp_path / "lenet.sg.pt"
    assert main(["compress", "--arch", "lenet5", "--conv-ratio", "0.5", "--fc-ratio", "0.5",
                 "--groups", "4", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    params = {}
    for convention in ("sgdet", "paper"):
        target = tmp_path / f"lenet_{convention}.pt"
        assert main(["export", str(out), "--format", "torchscript", "--out", str(target), "--json",
                     "--convention", convention]) == 0
        params[convention] = json.loads(capsys.readouterr().out)["deployed_params"]
    model = sgdet.load(out)
    assert params == {c: sgdet.count_params(sgdet.deploy(model), c) for c in ("sgdet", "paper")}
    assert params["paper"] == sgdet.count_params(model, "paper") < params["sgdet"]
