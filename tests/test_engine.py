"""The classification engine end to end on a tiny generated ImageFolder (4 classes of 32x32 PNGs
plus two unreadable files): baseline training, the G/LG/L schemes, eval, sweep, resume after
kill -9 (bit-identical to an uninterrupted run), DDP with two gloo processes, config errors and
corrupt images. LeNet-5 with 3 input channels at 28x28 keeps every run to a second or two."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import sgdet
from classification.__main__ import main
from classification.config import get_defaults
from sgdet.engine.reporting import epochs_string
from sgdet.schedule import Schedule
from sgdet.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
CLASSES = 4


def make_imagefolder(root: str, n_train: int = 8, n_val: int = 4, size: int = 32, seed: int = 0) -> str:
    """<root>/{train,val}/class<c>/<i>.png, learnable (class c brightens colour c / a square),
    plus a zero-byte and a text file posing as JPEGs in train/."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(CLASSES):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
                if c < 3:
                    img[:, :, c] += 120
                else:
                    img[8:24, 8:24] = 250
                Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
    open(os.path.join(root, "train", "class0", "zero.jpg"), "wb").close()
    with open(os.path.join(root, "train", "class1", "text.jpg"), "w") as handle:
        handle.write("this is not an image")
    return root


def write_config(path: str, data: str, out: str) -> str:
    text = f"""_BASE_: {ROOT}/configs/classification/Base-Classification.yaml
OUTPUT_DIR: {out}
DEVICE: cpu
MODEL:
  ARCH: lenet5
  NUM_CLASSES: {CLASSES}
  INPUT_SIZE: [3, 28, 28]
DATA:
  NAME: imagefolder
  ROOT: {data}
  BATCH_SIZE: 8
  TEST_BATCH_SIZE: 8
  WORKERS: 0
SOLVER:
  EPOCHS: 1
  LR: 0.05
  SCHEDULE: cosine
SG:
  GROUPS: 4
  STEP: 0.25
  CONV_RATIO: 0.5
  FC_RATIO: 0.5
  LOCAL_EPOCHS: 1
  LOCAL_LR: 0.01
"""
    with open(path, "w") as handle:
        handle.write(text)
    return path


def read_metrics(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def result_rows(folder: str) -> list[str]:
    """results.md's rows without their last (Run) column."""
    with open(os.path.join(folder, "results.md")) as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "| Model | Params | FLOPs | Top-1 (%) | Top-5 (%) | Epochs | Run |"
    return [line.rsplit(" | ", 1)[0] + " |" for line in lines[2:] if line.startswith("| ")]


def sg_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (sgdet.SGConv2d, sgdet.SGLinear))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Data, a config and a trained baseline (1 epoch), shared by the tests of this module."""
    base = tmp_path_factory.mktemp("engine")
    data = make_imagefolder(str(base / "data"))
    config = write_config(str(base / "tiny.yaml"), data, str(base / "out" / "baseline"))
    assert main(["train", "--config", config]) == 0
    weights = str(base / "out" / "baseline" / "model_final.sg.pt")
    return {"base": str(base), "data": data, "config": config, "weights": weights}


# ---------------------------------------------------------------------------------- configs

def test_every_shipped_config_loads():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "classification", "*.yaml")))
    names = {os.path.basename(p) for p in paths}
    for required in ("Base-Classification.yaml", "resnet50_imagenet.yaml", "resnet50_imagenet_sg_g.yaml",
                     "resnet50_imagenet_sg_lg.yaml", "resnet50_imagenet_sg_l.yaml",
                     "densenet201_imagenet_sg_g.yaml", "densenet201_imagenet_sg_lg.yaml",
                     "densenet121_cifar10.yaml", "densenet121_cifar10_sg_lg.yaml",
                     "densenet121_cifar100_sg_lg.yaml", "lenet5_fashion_mnist.yaml",
                     "lenet5_fashion_mnist_sg_lg.yaml", "ablation_groups.yaml"):
        assert required in names
    from classification.commands import load
    for path in paths:
        cfg = load(path)                         # merged with _BASE_ and validated
        assert cfg.MODEL.ARCH in sgdet.ARCHITECTURES, path
    lg = load_config(get_defaults(), os.path.join(ROOT, "configs/classification/resnet50_imagenet_sg_lg.yaml"))
    assert (lg.SG.SCHEME, lg.SG.GROUPS, lg.SG.STEP, lg.SG.LOCAL_EPOCHS, lg.SG.LOCAL_LR) == ("LG", 16, 0.1, 20, 1e-4)
    assert (lg.SOLVER.EPOCHS, lg.SOLVER.LR, list(lg.SOLVER.MILESTONES), lg.DATA.BATCH_SIZE) == (90, 0.01, [30, 60], 128)
    assert (lg.SOLVER.WEIGHT_DECAY, lg.SOLVER.MOMENTUM) == (1e-4, 0.9)
    cifar = load_config(get_defaults(), os.path.join(ROOT, "configs/classification/densenet121_cifar10_sg_lg.yaml"))
    assert (cifar.SG.GROUPS, cifar.SG.STEP, cifar.SG.LOCAL_EPOCHS, cifar.SG.LOCAL_LR) == (8, 0.05, 4, 0.001)
    assert (cifar.SOLVER.EPOCHS, cifar.SOLVER.LR) == (200, 0.01)


def test_epochs_column_as_the_paper_writes_it():
    assert epochs_string("90", global_=0) == "90"
    assert epochs_string("90", 6, 0, 90) == "90+90"                  # G
    assert epochs_string("90", 6, 20, 90) == "90+6*20+90"            # LG
    assert epochs_string("90", 8, 20, 0) == "90+8*20"                # L
    assert epochs_string("200", Schedule(0.75, 0.75, 0.05).steps, 4, 200) == "200+15*4+200"
    assert Schedule(0.8, 0.6, 0.1).steps == 8


@pytest.mark.parametrize("override, message", [
    (["SG.NOPE", "1"], "unknown config key SG.NOPE"),
    (["SG.CONV_RATIO", "1.5"], "conv_ratio must be in [0, 1)"),
    (["SG.SCHEME", "XY"], "SG.SCHEME must be one of"),
    (["SG.GROUPS", "0"], "groups must be an integer >= 1"),
    (["SOLVER.EPOCHS", "-1"], "SOLVER.EPOCHS must be an integer >= 0"),
    (["MODEL.ARCH", "resnet9000"], "unknown MODEL.ARCH"),
    (["SOLVER.LR"], "has no value"),
])
def test_config_errors_are_one_line_and_exit_2(workspace, capsys, override, message):
    out = os.path.join(workspace["base"], "out", "never")
    code = main(["compress", "--config", workspace["config"], "OUTPUT_DIR", out, *override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("classification: error:"), err
    assert message in err
    assert not os.path.exists(out)          # nothing written for a config that cannot run


def test_missing_config_unknown_yaml_key_and_class_mismatch(workspace, capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {workspace['config']}\nSOLVER:\n  EPOCS: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown config key SOLVER.EPOCS" in capsys.readouterr().err
    assert main(["train", "--config", workspace["config"], "MODEL.NUM_CLASSES", "10",
                 "OUTPUT_DIR", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]       # after the run's own log lines
    assert last.startswith("classification: error: MODEL.NUM_CLASSES is 10") and "has 4 classes" in last
    assert main(["eval", "--config", workspace["config"], "OUTPUT_DIR", str(tmp_path / "e")]) == 2
    assert "eval needs MODEL.WEIGHTS" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the schemes

def test_baseline_training_outputs(workspace):
    out = os.path.join(workspace["base"], "out", "baseline")
    model = sgdet.load(workspace["weights"])
    assert not sg_layers(model) and model.sgdet_meta["epochs"] == "1"
    rows = result_rows(out)
    assert len(rows) == 1 and rows[0].startswith("| LeNet-5 baseline |") and rows[0].endswith("| 1 |")
    events = [m["event"] for m in read_metrics(out)]
    assert events == ["epoch", "final"]
    assert glob.glob(os.path.join(out, "tb", "events.out.tfevents.*"))
    saved = load_config(get_defaults(), os.path.join(out, "config.yaml"))
    assert saved.MODEL.ARCH == "lenet5" and saved.SOLVER.EPOCHS == 1


@pytest.mark.parametrize("scheme, epochs", [("G", "1+1"), ("LG", "1+2*1+1"), ("L", "1+2*1")])
def test_scheme_end_to_end(workspace, scheme, epochs):
    out = os.path.join(workspace["base"], "out", f"scheme_{scheme}")
    code = main(["compress", "--config", workspace["config"], "SG.SCHEME", scheme,
                 "MODEL.WEIGHTS", workspace["weights"], "OUTPUT_DIR", out])
    assert code == 0
    model = sgdet.load(os.path.join(out, "model_final.sg.pt"))
    layers = sg_layers(model)
    assert set(layers) == {"features.3", "classifier.1", "classifier.3"}
    for name, layer in layers.items():
        assert abs(layer.pruned_fraction() - 0.5) < 0.03, (name, layer.pruned_fraction())
        assert layer.check_invariant() and layer.num_groups <= 4
        assert torch.all(layer.weight[~layer.weight_mask().expand_as(layer.weight)] == 0)
    meta = model.sgdet_meta
    assert meta["scheme"] == scheme and meta["epochs"] == epochs and meta["groups"] == 4
    rows = result_rows(out)
    assert len(rows) == 1
    assert rows[0].startswith(f"| LeNet-5-{scheme} (Conv-50/FC-50) |") and rows[0].endswith(f"| {epochs} |")
    metrics = read_metrics(out)
    events = [m["event"] for m in metrics]
    local = [m for m in metrics if m.get("phase") == "local"]
    glob_ = [m for m in metrics if m.get("phase") == "global"]
    assert events[0] == "baseline" and events[-1] == "final" and events.count("step") == 2
    assert len(local) == (2 if scheme in ("LG", "L") else 0)
    assert len(glob_) == (1 if scheme in ("G", "LG") else 0)
    steps = [m for m in metrics if m["event"] == "step"]
    assert [s["conv_target"] for s in steps] == [0.25, 0.5]
    assert steps[0]["params"] > steps[1]["params"] and "top1" in steps[1]
    final = metrics[-1]
    assert 0 <= final["top1"] <= final["top5"] <= 100
    assert final["params"] == sgdet.count(model, (3, 28, 28))["params"]
    assert abs(final["network_pruned"] - 0.5) < 0.02
    assert glob.glob(os.path.join(out, "tb", "events.out.tfevents.*"))
    assert load_config(get_defaults(), os.path.join(out, "config.yaml")).SG.SCHEME == scheme
    # a finished run resumed again does nothing
    assert main(["compress", "--config", os.path.join(out, "config.yaml"), "--resume"]) == 0
    assert len(result_rows(out)) == 1 and read_metrics(out) == metrics


def test_eval_of_a_compressed_model(workspace):
    weights = os.path.join(workspace["base"], "out", "scheme_LG", "model_final.sg.pt")
    if not os.path.exists(weights):
        assert main(["compress", "--config", workspace["config"], "SG.SCHEME", "LG", "MODEL.WEIGHTS",
                     workspace["weights"], "OUTPUT_DIR", os.path.dirname(weights)]) == 0
    out = os.path.join(workspace["base"], "out", "eval")
    assert main(["eval", "--config", workspace["config"], "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out]) == 0
    rows = result_rows(out)
    assert len(rows) == 1 and rows[0].startswith("| LeNet-5-LG (Conv-50/FC-50) |")
    (record,) = read_metrics(out)
    assert record["event"] == "eval" and record["eval"]["images"] == 16
    assert record["params"] == sgdet.count(sgdet.load(weights), (3, 28, 28))["params"]


def test_corrupt_images_are_skipped_and_counted(workspace):
    out = os.path.join(workspace["base"], "out", "corrupt")
    # one batch holds the whole training set, so every epoch reads both bad files
    assert main(["train", "--config", workspace["config"], "DATA.BATCH_SIZE", "64",
                 "SOLVER.EPOCHS", "2", "OUTPUT_DIR", out]) == 0
    epochs = [m for m in read_metrics(out) if m["event"] == "epoch"]
    assert [e["skipped"] for e in epochs] == [2, 2]
    log = open(os.path.join(out, "log.txt")).read()
    assert log.count("skipped 2 unreadable training image(s)") == 2
    assert "zero.jpg" in log and "text.jpg" in log


def test_sweep_writes_table_and_curves(workspace):
    out = os.path.join(workspace["base"], "out", "sweep")
    assert main(["sweep", "--config", workspace["config"], "MODEL.WEIGHTS", workspace["weights"],
                 "SG.SCHEME", "L", "SWEEP.KEY", "SG.GROUPS", "SWEEP.VALUES", "[1, 4]",
                 "OUTPUT_DIR", out]) == 0
    for value in (1, 4):
        sub = os.path.join(out, f"SG.GROUPS_{value}")
        assert os.path.isfile(os.path.join(sub, "model_final.sg.pt"))
        assert load_config(get_defaults(), os.path.join(sub, "config.yaml")).SG.GROUPS == value
    table = open(os.path.join(out, "sweep.md")).read().splitlines()
    assert table[0].startswith("| SG.GROUPS | Model |") and len(table) == 4
    summary = json.load(open(os.path.join(out, "sweep.json")))
    assert [r["value"] for r in summary["runs"]] == [1, 4]
    assert all(len(r["steps"]) == 2 for r in summary["runs"])
    with Image.open(os.path.join(out, "sweep.png")) as picture:
        assert picture.size[0] > 300
    # two keys varied together (Fig. 6: Conv vs FC)
    out2 = os.path.join(workspace["base"], "out", "sweep2")
    assert main(["sweep", "--config", workspace["config"], "MODEL.WEIGHTS", workspace["weights"],
                 "SG.SCHEME", "L", "SG.LOCAL_EPOCHS", "0", "SWEEP.KEY", "SG.CONV_RATIO,SG.FC_RATIO",
                 "SWEEP.VALUES", "[[0.5, 0], [0, 0.5]]", "OUTPUT_DIR", out2]) == 0
    runs = json.load(open(os.path.join(out2, "sweep.json")))["runs"]
    assert runs[0]["row"]["fc_pruned"] == 0 and runs[1]["row"]["conv_pruned"] == 0


# ---------------------------------------------------------------------------------- resume

def _state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _metrics_without_times(folder):
    records = read_metrics(folder)
    assert len({r.pop("run") for r in records}) == 1      # a resumed run keeps its run id
    for r in records:
        r.pop("seconds", None)
    return records


def _train_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["train_state"]
    except Exception:          # not there yet
        return None


def _kill_when(args, env, folder, ready, resume=False):
    """Start a compress run, SIGKILL it as soon as its checkpoint satisfies ``ready``."""
    victim = subprocess.Popen([PYTHON, "-m", "classification", *args, "OUTPUT_DIR", folder,
                               *(["--resume"] if resume else [])],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(folder, "last_checkpoint.pt")
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        state = _train_state(checkpoint) if os.path.exists(checkpoint) else None
        if state is not None and ready(state):
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(folder, "model_final.sg.pt")), "killed too late"
    return _train_state(checkpoint)


def test_resume_after_kill_matches_an_uninterrupted_run(workspace):
    """kill -9 right after the checkpoint of pruning step 1, resume, kill -9 again during global
    fine-tuning, resume: the final weights, masks, metrics and results row equal those of a run
    that was never interrupted."""
    args = ["compress", "--config", workspace["config"], "SG.SCHEME", "LG", "SG.STEP", "0.125",
            "SG.LOCAL_EPOCHS", "2", "SOLVER.EPOCHS", "6", "MODEL.WEIGHTS", workspace["weights"]]
    full = os.path.join(workspace["base"], "out", "uninterrupted")
    killed = os.path.join(workspace["base"], "out", "killed")
    # one thread per process: the two runs share the cores without OpenMP oversubscription
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    uninterrupted = subprocess.Popen([PYTHON, "-m", "classification", *args, "OUTPUT_DIR", full],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = _kill_when(args, env, killed, lambda s: s["phase"] == "prune" and s["t"] >= 1)
    assert state["phase"] == "prune" and 1 <= state["t"] < 4
    state = _kill_when(args, env, killed, lambda s: s["phase"] == "global", resume=True)
    assert state["phase"] == "global" and 1 <= state["epoch"] < 6
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == state["epoch"]
    resumed = subprocess.run([PYTHON, "-m", "classification", *args, "OUTPUT_DIR", killed, "--resume"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "global epoch(s) done" in resumed.stderr
    _, err = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, err[-2000:]

    a = _state_dict(os.path.join(full, "model_final.sg.pt"))
    b = _state_dict(os.path.join(killed, "model_final.sg.pt"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key           # weights, BN stats, groups and masks
    assert _metrics_without_times(full) == _metrics_without_times(killed)   # nothing lost or doubled
    assert result_rows(full) == result_rows(killed)
    assert not glob.glob(os.path.join(killed, ".tmp-*"))


def test_last_checkpoint_is_an_sgdet_checkpoint_with_plain_state(workspace):
    """last_checkpoint.pt loads with weights_only=True, holds the run state and RNG states, and
    sgdet.load reads it as a model."""
    path = os.path.join(workspace["base"], "out", "baseline", "last_checkpoint.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload["train_state"]
    assert payload["format"] == "sgdet-checkpoint" and state["kind"] == "train"
    assert state["phase"] == "done" and state["epoch"] == 1 and state["world_size"] == 1
    rng = state["rng"][0]
    assert rng["torch"].dtype == torch.uint8 and rng["numpy"]["keys"].numel() == 624
    assert isinstance(rng["python"]["version"], int)
    assert sgdet.load(path).sgdet_meta["phase"] == "done"


# --------------------------------------------------------------------------------------- DDP

def test_ddp_two_cpu_processes(workspace):
    """torchrun with 2 gloo processes: every rank computes the same groups and masks (checked
    across ranks at every step), only rank 0 writes, and the result is complete."""
    out = os.path.join(workspace["base"], "out", "ddp")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "classification",
                           "compress", "--config", workspace["config"], "SG.SCHEME", "LG",
                           "MODEL.WEIGHTS", workspace["weights"], "OUTPUT_DIR", out],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("groups and masks identical on all 2 ranks") == 2     # t = 1, 2
    assert "different groupings" not in proc.stderr
    assert proc.stderr.count("result: | LeNet-5-LG") == 1                          # rank 0 only
    assert sorted(os.listdir(out)) == ["config.yaml", "last_checkpoint.pt", "log.txt", "metrics.jsonl",
                                       "model_final.sg.pt", "results.md", "tb"]
    assert len(os.listdir(os.path.join(out, "tb"))) == 1
    assert len(result_rows(out)) == 1
    metrics = read_metrics(out)
    assert [m["event"] for m in metrics].count("final") == 1
    assert metrics[-1]["eval"]["images"] == 16                     # val shards cover every image once
    model = sgdet.load(os.path.join(out, "model_final.sg.pt"))
    for layer in sg_layers(model).values():
        assert abs(layer.pruned_fraction() - 0.5) < 0.03 and layer.check_invariant()
    state = torch.load(os.path.join(out, "last_checkpoint.pt"), weights_only=True)["train_state"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def _sync_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from sgdet.engine.distributed import DistContext
    from sgdet.engine.distributed import sync_structure
    from sgdet.compress import convert, prune_step
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)          # different weights: k-means disagrees across ranks
        model = sgdet.build("lenet5")
        layers = convert(model)
        prune_step(layers, 0.5, 0.5, groups=4, seed=0)
        ctx = DistContext(rank=rank, world_size=world, backend="gloo")
        fp = sync_structure(layers, ctx, t=1)
        torch.save({"fingerprint": fp, "state": {k: v.clone() for k, v in model.state_dict().items()
                                                 if k.startswith(("features.3", "classifier"))}},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_structure_makes_ranks_identical(tmp_path):
    """Even when ranks compute different groupings, rank 0's groups, masks and SG weights win."""
    import torch.multiprocessing as mp
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["fingerprint"] == r1["fingerprint"]
    for key in r0["state"]:
        if key.endswith((".group", ".mask", ".weight")):
            assert torch.equal(r0["state"][key], r1["state"][key]), key


def test_evaluation_does_not_change_training(workspace, tmp_path):
    """Issue 15, bug 2: SOLVER.EVAL_PERIOD 1 and 0 train the same weights (random crops and
    flips draw from the global RNG; an eval loader used to draw from it too)."""
    weights = {}
    for period in (1, 0):
        out = str(tmp_path / f"eval{period}")
        assert main(["train", "--config", workspace["config"], "OUTPUT_DIR", out, "SOLVER.EPOCHS", "2",
                     "SOLVER.EVAL_PERIOD", str(period)]) == 0
        weights[period] = sgdet.load(os.path.join(out, "model_final.sg.pt")).state_dict()
    assert all(torch.equal(weights[1][k], weights[0][k]) for k in weights[0])
