"""tools/train_net.py end to end on a generated COCO-format shapes dataset at 128 px: training
from a compressed checkpoint, a crash after a mid-epoch checkpoint and ``--resume``, masks kept
through training, ``--eval-only`` at two input sizes, the configs, bad input (one line, exit 2),
two processes through ``--num-gpus 2`` (gloo on the CPU) and detectron2 registration where it
is installed."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import sgdet
from sgdet.detection.config import get_defaults, validate_config
from sgdet.detection.trainer import DetectionTrainer
from sgdet.detection.shapes import make_shapes_dataset
from sgdet.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import train_net  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Datasets root with shapes/train (6 images) and shapes/val (3), and a resnet50 compressed
    one-shot to Conv-60/FC-60 (g=4)."""
    root = tmp_path_factory.mktemp("det")
    make_shapes_dataset(root / "shapes" / "train", 6, 128, seed=0)
    make_shapes_dataset(root / "shapes" / "val", 3, 128, seed=1)
    torch.manual_seed(0)
    model = sgdet.build("resnet50")
    sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.6, groups=4, step=None, seed=0)
    weights = str(root / "r50_c60.sg.pt")
    sgdet.save(model, weights, meta={"label": "SG-ResNet50 (Conv-60/FC-60)"})
    return root, weights


def _opts(root, out, weights="", **extra) -> list[str]:
    """Overrides that make the paper's config tiny: 128 px, batch 2, small RPN/RoI budgets."""
    opts = {
        "DATASETS.ROOT": str(root),
        "DATASETS.REGISTER": '[["t_train","shapes/train/instances.json","shapes/train/images"],'
                             '["t_val","shapes/val/instances.json","shapes/val/images"]]',
        "DATASETS.TRAIN": '["t_train"]', "DATASETS.TEST": '["t_val"]',
        "MODEL.ROI_HEADS.NUM_CLASSES": "3", "MODEL.DEVICE": "cpu", "MODEL.WEIGHTS": weights,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "16", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": "4",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN": "50",
        "MODEL.RPN.PRE_NMS_TOPK_TEST": "200", "MODEL.RPN.POST_NMS_TOPK_TEST": "20",
        "INPUT.MIN_SIZE_TRAIN": "[128]", "INPUT.MAX_SIZE_TRAIN": "128",
        "INPUT.MIN_SIZE_TEST": "[96,128]", "INPUT.MAX_SIZE_TEST": "128",
        "SOLVER.IMS_PER_BATCH": "2", "SOLVER.EPOCHS": "2", "SOLVER.WARMUP_ITERS": "2",
        "SOLVER.CHECKPOINT_PERIOD": "1", "SOLVER.DECAY_EPOCHS": "[1]",
        "DATALOADER.NUM_WORKERS": "0", "OUTPUT_DIR": str(out), **extra}
    return [item for pair in opts.items() for item in pair]


def _config(*opts):
    return load_config(get_defaults(), os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml"), list(opts))


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


class Crash(Exception):
    pass


def test_train_crash_resume_then_eval_only(data, tmp_path, monkeypatch, capsys):
    root, weights = data
    out = tmp_path / "run"
    config = os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml")
    argv = ["--config-file", config, *_opts(root, out, weights)]

    # crash right after the checkpoint written at iteration 2 of epoch 2 (a kill at that moment)
    real_save = DetectionTrainer.save_checkpoint

    def save_then_crash(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        if self.state["epoch"] == 1 and self.state.get("iteration") == 2:
            raise Crash()
    monkeypatch.setattr(DetectionTrainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train_net.main(argv)
    monkeypatch.undo()
    state = torch.load(out / "last_checkpoint.pt", weights_only=True)["train_state"]
    assert (state["epoch"], state["iteration"], state["iterations_total"]) == (1, 2, 5)
    assert not (out / "model_final.pth").exists()

    assert train_net.main(argv + ["--resume"]) == 0
    state = torch.load(out / "last_checkpoint.pt", weights_only=True)["train_state"]
    assert state["phase"] == "done" and state["iterations_total"] == 6      # 3 + 3, none repeated
    log = (out / "log.txt").read_text()
    assert "resuming from" in log and "1 global epoch(s) done" in log
    epochs = [r for r in _metrics(out) if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]                          # rewound, not doubled
    assert epochs[0]["lr"] == pytest.approx(0.01) and epochs[1]["lr"] == pytest.approx(0.001)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(epochs[1])

    # issue 15, bug 1: the resumed run equals one never killed, every tensor
    straight = tmp_path / "straight"
    assert train_net.main(["--config-file", config, *_opts(root, straight, weights)]) == 0
    resumed_state = sgdet.load(str(out / "model_final.pth")).state_dict()
    straight_state = sgdet.load(str(straight / "model_final.pth")).state_dict()
    differ = [k for k in straight_state if not torch.equal(straight_state[k], resumed_state[k])]
    assert not differ, f"{len(differ)} of {len(straight_state)} tensors differ, e.g. {differ[:3]}"

    # masks and groups survived training; pruned weights are exactly zero
    source = {n: m for n, m in sgdet.load(weights).named_modules() if isinstance(m, sgdet.SGConv2d)}
    detector = sgdet.load(str(out / "model_final.pth"))
    trained = {n: m for n, m in detector.named_modules() if isinstance(m, sgdet.SGConv2d)}
    assert len(trained) == len(source) and len(trained) > 40
    pairs = [("backbone.body.layer3.5.conv2", "layer3.5.conv2"),
             ("roi_heads.box_head.stage.2.conv3", "layer4.2.conv3")]
    for det_name, cls_name in pairs:
        assert torch.equal(trained[det_name].mask, source[cls_name].mask)
        assert torch.equal(trained[det_name].group, source[cls_name].group)
        assert not torch.equal(trained[det_name].weight, source[cls_name].weight)   # it trained
    for layer in trained.values():
        assert (layer.weight[~layer.mask] == 0).all()
    results = (out / "results.md").read_text()
    assert "mAP(96) | mAP(128)" in results and "SG-ResNet50 (Conv-60/FC-60)" in results

    # --eval-only of the trained detector: both sizes, JSON files, a Table 6 row; deployed too
    capsys.readouterr()
    eval_out = tmp_path / "eval"
    assert train_net.main(["--config-file", config, "--eval-only",
                           *_opts(root, eval_out, str(out / "model_final.pth"), **{"TEST.DEPLOY": "True"})]) == 0
    printed = capsys.readouterr().out
    assert "t_val @96 px: AP" in printed and "t_val @128 px: AP" in printed
    header = next(line for line in printed.splitlines() if line.startswith("Model"))
    assert header.split()[-2:] == ["mAP(96)", "mAP(128)"]          # the sizes tested, not 300 / 600
    metrics = json.loads((eval_out / "inference" / "coco_metrics.json").read_text())
    assert set(metrics["sizes"]) == {"96", "128"} and metrics["deployed"] is True
    assert set(metrics["sizes"]["128"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert len(glob.glob(str(eval_out / "inference" / "coco_instances_results_t_val_*.json"))) == 2
    assert not (eval_out / "last_checkpoint.pt").exists()


def test_every_shipped_config_loads_and_validates():
    configs = sorted(glob.glob(os.path.join(ROOT, "configs", "detection", "*.yaml")))
    assert len(configs) >= 6
    configs.append(os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml"))   # the documented path
    for path in configs:
        cfg = load_config(get_defaults(), path)
        validate_config(cfg)
    base = _config()
    assert (base.SOLVER.IMS_PER_BATCH, base.SOLVER.BASE_LR, base.SOLVER.EPOCHS) == (16, 0.01, 10)
    assert list(base.INPUT.MIN_SIZE_TEST) == [300, 600]
    assert list(base.DATASETS.TRAIN) == ["coco_2014_trainval_minus_minival"]
    assert _config("MODEL.BACKBONE.NAME", "sg_densenet201").MODEL.BACKBONE.NAME == "sg_densenet201"


@pytest.mark.parametrize("extra, message", [
    (["SOLVER.BASE_LRR", "0.1"], "unknown config key SOLVER.BASE_LRR"),
    (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH must be an integer >= 1"),
    (["MODEL.BACKBONE.NAME", "sg_vgg"], "unknown MODEL.BACKBONE.NAME 'sg_vgg'"),
    (["DATASETS.ROOT", "/nonexistent/datasets"], "/nonexistent/datasets"),
    (["MODEL.WEIGHTS", "/nonexistent/w.sg.pt"], "MODEL.WEIGHTS not found"),
    (["MODEL.ROI_HEADS.NUM_CLASSES", "80"], "NUM_CLASSES is 80 but the datasets have 3"),
    (["INPUT.MIN_SIZE_TEST", "[]"], "INPUT.MIN_SIZE_TEST is empty"),
    (["DATASETS.REGISTER", '[["only_a_name"]]'], "DATASETS.REGISTER entries are [name, json_file, image_root]"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, extra, message):
    root, _ = data
    opts = _opts(root, tmp_path / "bad")
    for key, value in zip(extra[::2], extra[1::2]):
        if key in opts:
            opts[opts.index(key) + 1] = value
        else:
            opts += [key, value]
    code = train_net.main(["--config-file", os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml"), *opts])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and err.startswith("train_net.py: error:")


def test_corrupt_checkpoint_and_missing_config(data, tmp_path, capsys):
    root, _ = data
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint at all")
    code = train_net.main(["--config-file", os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml"),
                           "--eval-only", *_opts(root, tmp_path / "e", str(bad))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "broken.pth" in err
    assert train_net.main(["--config-file", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_two_processes_with_num_gpus_flag(data, tmp_path):
    """``--num-gpus 2`` on a machine without CUDA: two gloo processes, one image each."""
    root, weights = data
    out = tmp_path / "ddp"
    opts = _opts(root, out, weights, **{"SOLVER.EPOCHS": "1", "INPUT.MIN_SIZE_TEST": "[128]",
                                        "SOLVER.CHECKPOINT_PERIOD": "0"})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file",
                           os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml"), "--num-gpus", "2", *opts],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "distributed: 2 processes (gloo)" in log
    epoch = [r for r in _metrics(out) if r["event"] == "epoch"][0]
    assert epoch["iterations"] == 3                # 6 images / (2 processes x 1 image)
    assert (out / "model_final.pth").exists()


def test_launch_flag_errors(capsys):
    assert train_net.main(["--config-file", os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml"),
                           "--num-gpus", "2", "--num-machines", "2", "--dist-url", "auto"]) == 2
    assert "--dist-url auto works on one machine only" in capsys.readouterr().err
    assert train_net.main(["--config-file", os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml"),
                           "--num-gpus", "1", "--num-machines", "2", "--machine-rank", "2"]) == 2
    assert "--machine-rank 2 must be below --num-machines 2" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is None, reason="detectron2 is not installed")
def test_detectron2_registry_builds_sg_backbones(data):
    from detectron2.config import get_cfg
    from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
    import sgdet.detection.backbones.detectron2_compat as compat
    _, weights = data
    cfg = get_cfg()
    compat.add_sg_config(cfg)
    cfg.MODEL.SG.WEIGHTS = weights
    for name in ("build_sg_resnet50_backbone", "build_sg_resnet50_fpn_backbone"):
        assert name in BACKBONE_REGISTRY
        cfg.MODEL.BACKBONE.NAME = name
        backbone = build_backbone(cfg)
        features = backbone(torch.rand(1, 3, 128, 128))
        for key, spec in backbone.output_shape().items():
            assert features[key].shape[1] == spec.channels
            assert features[key].shape[-1] == 128 // spec.stride
