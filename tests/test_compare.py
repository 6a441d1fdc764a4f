"""`python -m classification compare` (classification/compare.py, classification/rivals.py): SG-CNN,
fixed equal groups, unstructured and channel pruning at one budget on tiny generated
Fashion-MNIST files with LeNet-5, end to end (budgets met, every report written, --resume keeps
the finished runs); the FLOP budget's planning; the fixed-groups option of the one schedule; bad
COMPARE values as one-line errors."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import sgdet
from classification.__main__ import main
from classification.commands import load
from classification.compare import prunable, sg_ratio
from classification.rivals import Channel, Unstructured
from sgdet.compress import convert
from sgdet.grouping import fixed_groups
from sgdet.schedule import prune_step
from test_demo import write_idx_gz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("sg", "fixed", "unstructured", "channel")
RATIO = 0.8


def write_config(path, data, out, *extra: str) -> str:
    text = f"""_BASE_: {ROOT}/configs/classification/lenet5_fashion_mnist.yaml
OUTPUT_DIR: {out}
DEVICE: cpu
DATA:
  ROOT: {data}
  BATCH_SIZE: 64
  TEST_BATCH_SIZE: 256
  LIMIT_TRAIN: 256
SOLVER:
  EPOCHS: 1
  LR: 0.01
SG:
  SCHEME: G
  GROUPS: 4
  STEP: 0.5
  EVAL_EACH_STEP: False
COMPARE:
  RATIOS: [{RATIO}]
  BASELINE_EPOCHS: 1
  BASELINE_LR: 0.05
  TIMING_BATCH: 8
  TIMING_REPEATS: 3
""" + "".join(f"{line}\n" for line in extra)
    with open(path, "w") as handle:
        handle.write(text)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    os.environ["SGDET_CACHE"] = str(base / "cache")
    data = write_idx_gz(str(base / "fashion"))
    config = write_config(str(base / "tiny.yaml"), data, str(base / "out"))
    yield {"base": base, "data": data, "config": config, "out": base / "out"}
    os.environ.pop("SGDET_CACHE", None)


@pytest.fixture(scope="module")
def finished(workspace):
    assert main(["compare", "--config", workspace["config"]]) == 0
    return workspace


def test_compare_end_to_end(finished):
    out = finished["out"]
    for name in ("compare.md", "compare.json", "compare.png", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "compare.json").read_text())
    assert summary["budget"] == "params" and summary["ratios"] == [RATIO]
    runs = {r["method"]: r for r in summary["runs"]}
    assert sorted(runs) == sorted(METHODS)
    base = summary["baseline"]
    assert base["params"] == 431080 and base["top1"] > 50       # the baseline really learned
    for method, run in runs.items():
        # the same budget: within 1 point of the baseline's params of the target
        assert abs(run["params_pruned"] - RATIO) <= 0.01, (method, run["params_pruned"])
        assert run["within_budget"] and run["latency_ms"] > 0 and run["top1"] > 0
        assert run["epochs"] == runs["sg"]["epochs"] == "1+1"  # the same fine-tuning budget
        assert (out / f"r{RATIO:g}" / method / "config.yaml").is_file()
    # each method's model really has the structure it claims
    sg = sgdet.load(str(out / f"r{RATIO:g}" / "sg" / "model_final.sg.pt"))
    assert sgdet.count(sg, (1, 28, 28))["params"] == runs["sg"]["params"]
    fixed = sgdet.load(str(out / f"r{RATIO:g}" / "fixed" / "model_final.sg.pt"))
    layer = fixed.get_submodule("classifier.1")
    assert layer.group_sizes().tolist() == [125] * 4 and runs["fixed"]["model"].endswith("fixed groups")
    unstructured = sgdet.load(str(out / f"r{RATIO:g}" / "unstructured" / "model_final.sg.pt"))
    zeros = sum(int((unstructured.get_submodule(n).weight == 0).sum())
                for n in ("features.3", "classifier.1", "classifier.3"))
    assert sgdet.count(unstructured, (1, 28, 28))["params"] - zeros == runs["unstructured"]["params"]
    assert runs["sg"]["deploy_error"] < 1e-3 and runs["fixed"]["deploy_error"] < 1e-3
    table = (out / "compare.md").read_text()
    assert table.count("\n| 80% |") == 4 and "| baseline |" in table
    assert "SG-CNN (k-means groups)" in table and "channel (Torch-Pruning)" in table
    assert not [p for p in os.listdir(out) if p.startswith(".tmp") or p.endswith(".tmp")]


def test_resume_keeps_finished_runs(finished, capsys):
    out = finished["out"]
    before = json.loads((out / "compare.json").read_text())
    assert main(["compare", "--config", finished["config"], "--resume"]) == 0
    after = json.loads((out / "compare.json").read_text())
    for a, b in zip(before["runs"], after["runs"]):
        assert (a["method"], a["params"], a["flops"], a["top1"]) == (b["method"], b["params"], b["flops"], b["top1"])
    assert "kept the finished run" in capsys.readouterr().err


def test_flop_budget_is_met_by_every_method():
    """The FLOP switch: each method's plan meets a FLOP budget within 1 point (no training)."""
    torch.manual_seed(0)
    cfg = load(None, ["MODEL.ARCH", "lenet5", "MODEL.INPUT_SIZE", [1, 28, 28], "MODEL.NUM_CLASSES", 10,
                      "COMPARE.BUDGET", "flops"])
    size, ratio = (1, 28, 28), 0.7
    model = sgdet.build("lenet5")
    full, share = prunable(model, cfg)
    r = sg_ratio(ratio, "flops", full, share)
    sg = copy.deepcopy(model)
    sgdet.compress(sg, r, r, groups=4, step=None)
    achieved = {"sg": 1 - sgdet.count(sg, size)["flops"] / full["flops"]}
    for scope in ("global", "layer"):
        pruned = copy.deepcopy(model)
        rival = Unstructured(cfg, "flops", ratio * full["flops"], scope)
        rival.start(pruned, size, [0.5, 1.0], "cpu")
        rival.step(pruned, 0.5)
        rival.step(pruned, 1.0)
        achieved[scope] = 1 - rival.counts(pruned, size)["flops"] / full["flops"]
    channel = Channel(cfg, "flops", (1 - ratio) * full["flops"], 0.01, full)
    channel.plan(model, size)
    pruned = copy.deepcopy(model)
    channel.start(pruned, size, [1.0], "cpu")
    channel.step(pruned, 1.0)
    achieved["channel"] = 1 - sgdet.count(pruned, size)["flops"] / full["flops"]
    for method, value in achieved.items():
        assert abs(value - ratio) <= 0.01, (method, value)


def test_fixed_groups_are_an_option_of_the_one_schedule():
    labels = fixed_groups(torch.rand(10, 6, dtype=torch.float64), 4).labels
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]          # contiguous, sizes 3/2/3/2
    model = sgdet.build("lenet5")
    layers = convert(model)
    prune_step(layers, 0.5, 0.5, groups=4, grouping="fixed")
    for layer in layers.values():
        sizes = layer.group_sizes()
        assert int(sizes.max() - sizes.min()) <= 1 and layer.check_invariant()
        assert abs(layer.pruned_fraction() - 0.5) < 0.05
    with pytest.raises(sgdet.ConfigError, match="grouping must be one of"):
        sgdet.compress(sgdet.build("lenet5"), 0.5, 0.5, grouping="random")


def test_unreachable_ratio_is_a_clear_error():
    with pytest.raises(sgdet.ConfigError, match="cannot be met"):
        sg_ratio(0.999, "params", {"params": 1000}, {"params": 990})


@pytest.mark.parametrize("override, message", [
    (["COMPARE.BUDGET", "latency"], "COMPARE.BUDGET must be params or flops"),
    (["COMPARE.RATIOS", "[1.5]"], "COMPARE.RATIOS entries must be numbers in (0, 1)"),
    (["COMPARE.RATIOS", "[]"], "COMPARE.RATIOS is empty"),
    (["COMPARE.RATIOS", "[0.5, 0.5]"], "COMPARE.RATIOS has a repeated entry"),
    (["COMPARE.METHODS", "['sg', 'magic']"], "COMPARE.METHODS has unknown method 'magic'"),
    (["COMPARE.UNSTRUCTURED", "random"], "COMPARE.UNSTRUCTURED must be global or layer"),
    (["COMPARE.TOLERANCE", "0.0"], "COMPARE.TOLERANCE must be a positive number"),
    (["COMPARE.TIMING_BATCH", "0"], "COMPARE.TIMING_BATCH must be an integer >= 1"),
    (["SG.GROUPING", "random"], "SG.GROUPING must be one of kmeans, fixed"),
    (["COMPARE.BASELINE_EPOCHS", "0"], "compare needs MODEL.WEIGHTS or COMPARE.BASELINE_EPOCHS > 0"),
    (["COMPARE.NOPE", "1"], "unknown config key COMPARE.NOPE"),
])
def test_bad_compare_values_are_one_line_errors(workspace, capsys, tmp_path, override, message):
    out = tmp_path / "never"
    code = main(["compare", "--config", workspace["config"], "OUTPUT_DIR", str(out), *override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("classification: error:") and message in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
