"""The detectron2 bridge as detectron2 users run it: tools/train_net_detectron2.py and
configs/detectron2/*.yaml. Everywhere: the entry point's one-line error without detectron2 and the
configs' VERSION and RPN width (plain yaml, following _BASE_). Where detectron2 is installed (the
rest skip): a C4 model reads its checkpoint once, the configs build the widths they say, the
config's DATASETS.REGISTER data registers, and train + --eval-only run for C4 and FPN on a
generated shapes dataset with every mask kept."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch
import yaml

import sgdet
from sgdet.detection.shapes import make_shapes_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "train_net_detectron2.py")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "detectron2", "*.yaml")))

pytestmark = pytest.mark.usefixtures("one_thread")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolved(path: str) -> dict:
    """A yaml with its _BASE_ chain merged in (detectron2's rule: the file overrides its base)."""
    with open(path) as handle:
        cfg = yaml.safe_load(handle) or {}
    base = cfg.pop("_BASE_", None)
    return _merge(_resolved(os.path.join(os.path.dirname(path), base)), cfg) if base else cfg


# ------------------------------------------------------------------ everywhere (no detectron2)

def test_configs_are_version_2_with_the_suites_rpn_width():
    backbones = set()
    for path in CONFIGS:
        cfg = _resolved(path)
        assert cfg.get("VERSION") == 2, path
        if os.path.basename(path).startswith("Base-"):
            continue
        model = cfg["MODEL"]
        backbones.add(model["BACKBONE"]["NAME"])
        c4 = model["RPN"]["IN_FEATURES"] == ["res4"]
        # the suite's C4RPNHead: 3x3 conv to 512; its FPN: torchvision's RPNHead, input width (256)
        assert model["RPN"]["CONV_DIMS"] == ([512] if c4 else [-1]), path
        assert model["ROI_HEADS"]["NAME"] == ("SGRes5ROIHeads" if c4 else "StandardROIHeads"), path
        assert model["SG"] == {"WEIGHTS": "", "FREEZE_BN": True}, path
    assert backbones == {"build_sg_resnet50_backbone", "build_sg_densenet201_backbone",
                         "build_sg_resnet50_fpn_backbone"}


def test_entry_point_without_detectron2_is_one_line():
    code = ("import runpy, sys; sys.modules['detectron2'] = None; "   # an import of it fails here too
            f"sys.argv = [{TOOL!r}, '--config-file', {CONFIGS[0]!r}]; "
            f"runpy.run_path({TOOL!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "detectron2 is needed" in proc.stderr and "tools/train_net.py" in proc.stderr


# ------------------------------------------------------------------ where detectron2 is installed

@pytest.fixture(scope="module")
def d2():
    pytest.importorskip("detectron2")
    import sgdet.detection.backbones.detectron2_compat as compat
    return compat


@pytest.fixture(scope="module")
def data(d2, tmp_path_factory):
    """Datasets root with shapes/train (4 images) and shapes/val (2), and a resnet50 compressed
    one-shot to Conv-60/FC-60 (g=4)."""
    root = tmp_path_factory.mktemp("d2")
    make_shapes_dataset(root / "shapes" / "train", 4, 128, seed=0)
    make_shapes_dataset(root / "shapes" / "val", 2, 128, seed=1)
    torch.manual_seed(0)
    model = sgdet.build("resnet50")
    sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.6, groups=4, step=None, seed=0)
    weights = str(root / "r50_c60.sg.pt")
    sgdet.save(model, weights)
    return root, weights


def _cfg(d2, name: str, *opts):
    from detectron2.config import get_cfg
    cfg = get_cfg()
    d2.add_sg_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "detectron2", name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _count_full_reads(monkeypatch, path: str) -> list:
    """Every torch.load of ``path`` that reads its tensors (a header peek maps, it does not read)."""
    reads, real = [], torch.load
    target = os.path.realpath(path)

    def counting(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.realpath(f) == target and not kwargs.get("mmap"):
            reads.append(f)
        return real(f, *args, **kwargs)
    monkeypatch.setattr(torch, "load", counting)
    return reads


def test_c4_model_reads_its_checkpoint_once(d2, data, monkeypatch):
    from detectron2.modeling import build_model
    _, weights = data
    reads = _count_full_reads(monkeypatch, weights)
    cfg = _cfg(d2, "faster_rcnn_sg_r50_c4.yaml", "MODEL.SG.WEIGHTS", weights, "MODEL.ROI_HEADS.NUM_CLASSES", "3")
    model = build_model(cfg)
    assert len(reads) == 1
    # backbone and head are the file's network: layer3 in the backbone, layer4 in the head
    saved = sgdet.load(weights).state_dict()
    state = model.state_dict()
    assert torch.equal(state["backbone.inner.body.layer3.0.conv1.mask"], saved["layer3.0.conv1.mask"])
    assert torch.equal(state["roi_heads.res5.head.stage.2.conv2.weight"], saved["layer4.2.conv2.weight"])
    assert torch.equal(state["roi_heads.res5.head.stage.2.conv2.mask"], saved["layer4.2.conv2.mask"])
    assert model.proposal_generator.rpn_head.conv.out_channels == 512
    build_model(cfg)                     # a second model reads the file again, once
    assert len(reads) == 3               # (+1 by sgdet.load above)
    from detectron2.utils.events import EventStorage
    model.train()
    with EventStorage(0):
        losses = model([{"image": torch.rand(3, 128, 128) * 255, "instances": _instances()}])
    assert {"loss_rpn_cls", "loss_cls", "loss_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def _instances():
    from detectron2.structures import Boxes, Instances
    inst = Instances((128, 128))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 70.0]]))
    inst.gt_classes = torch.tensor([1])
    return inst


def test_densenet201_c4_config_builds_a_512_wide_rpn(d2):
    from detectron2.modeling import build_model
    model = build_model(_cfg(d2, "faster_rcnn_sg_densenet201_c4.yaml", "MODEL.BACKBONE.FREEZE_AT", "0"))
    assert model.backbone.output_shape()["res4"].channels == 1792
    conv = model.proposal_generator.rpn_head.conv
    assert (conv.in_channels, conv.out_channels) == (1792, 512)
    assert model.roi_heads.box_predictor.cls_score.in_features == 1920


def test_register_config_datasets(d2, data):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from sgdet.errors import ConfigError, DatasetError
    root, _ = data
    entries = '[["d2t_val","shapes/val/instances.json","shapes/val/images"]]'
    cfg = _cfg(d2, "faster_rcnn_sg_r50_c4.yaml", "DATASETS.ROOT", str(root), "DATASETS.REGISTER", entries)
    assert d2.register_config_datasets(cfg) == ["d2t_val"]
    assert d2.register_config_datasets(cfg) == ["d2t_val"]        # again: kept
    assert len(DatasetCatalog.get("d2t_val")) == 2
    assert MetadataCatalog.get("d2t_val").json_file == str(root / "shapes/val/instances.json")
    cfg2 = _cfg(d2, "faster_rcnn_sg_r50_c4.yaml", "DATASETS.ROOT", str(root), "DATASETS.REGISTER",
                '[["d2t_val","shapes/train/instances.json","shapes/train/images"]]')
    d2.register_config_datasets(cfg2)                              # ours: replaced
    assert len(DatasetCatalog.get("d2t_val")) == 4
    with pytest.raises(ConfigError, match="already registered in detectron2"):
        d2.register_config_datasets(_cfg(d2, "faster_rcnn_sg_r50_c4.yaml", "DATASETS.ROOT", str(root), "DATASETS.REGISTER",
                                         '[["coco_2014_minival","shapes/val/instances.json","shapes/val/images"]]'))
    with pytest.raises(DatasetError, match="annotation file not found"):
        d2.register_config_datasets(_cfg(d2, "faster_rcnn_sg_r50_c4.yaml", "DATASETS.ROOT", str(root),
                                         "DATASETS.REGISTER", '[["d2t_x","nope.json","shapes/val/images"]]'))


def _tool():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_net_detectron2
    return train_net_detectron2


def _masks(state: dict, skip_prefix: str = "") -> tuple[int, int]:
    """(kept, pruned) connections over every conv mask of a state dict."""
    kept = pruned = 0
    for key, value in state.items():
        if key.endswith(".mask") and value.dim() == 2 and not (skip_prefix and key.startswith(skip_prefix)):
            kept += int(value.sum())
            pruned += int((~value).sum())
    return kept, pruned


@pytest.mark.parametrize("config", ["faster_rcnn_sg_r50_c4.yaml", "faster_rcnn_sg_r50_fpn.yaml"])
def test_train_then_eval_only(d2, data, tmp_path, config, capsys):
    tool = _tool()
    root, weights = data
    out = tmp_path / "out"
    argv = ["--config-file", os.path.join(ROOT, "configs", "detectron2", config),
            "MODEL.DEVICE", "cpu", "MODEL.SG.WEIGHTS", weights, "MODEL.ROI_HEADS.NUM_CLASSES", "3",
            "DATASETS.ROOT", str(root),
            "DATASETS.REGISTER", '[["d2s_train","shapes/train/instances.json","shapes/train/images"],'
                                 '["d2s_val","shapes/val/instances.json","shapes/val/images"]]',
            "DATASETS.TRAIN", '("d2s_train",)', "DATASETS.TEST", '("d2s_val",)',
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
            "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]
    assert tool.main(argv) == 0
    final = out / "model_final.pth"
    assert final.is_file() and (out / "inference" / "coco_instances_results.json").is_file()
    trained = torch.load(final, map_location="cpu", weights_only=True)["model"]
    assert _masks(trained) == _masks(sgdet.load(weights).state_dict(), skip_prefix="fc.")
    for key, mask in trained.items():    # pruned connections stayed exactly zero
        if key.endswith(".mask") and mask.dim() == 2:
            weight = trained[key[:-len("mask")] + "weight"]
            assert not weight[~mask].any(), key
    capsys.readouterr()
    assert tool.main(argv[:2] + ["--eval-only"] + argv[2:] + ["MODEL.WEIGHTS", str(final)]) == 0
    assert "bbox" in capsys.readouterr().out + "".join(open(out / "log.txt").readlines()[-40:])


def test_entry_point_bad_input_is_one_line(d2, data, tmp_path, capsys):
    tool = _tool()
    config = os.path.join(ROOT, "configs", "detectron2", "faster_rcnn_sg_r50_c4.yaml")
    cases = [(["--config-file", str(tmp_path / "none.yaml")], "config file not found"),
             (["--config-file", config, "MODEL.NOPE", "1"], "override: Non-existent key: MODEL.NOPE"),
             (["--config-file", config, "MODEL.SG.FREEZE_BN"], "override: "),
             (["--config-file", config, "MODEL.SG.WEIGHTS", str(tmp_path / "x.sg.pt")], "MODEL.SG.WEIGHTS not found"),
             (["--config-file", config, "DATASETS.TRAIN", '("nobody",)'], "'nobody', which is not registered"),
             (["--config-file", config, "--eval-only", "DATASETS.TEST", '("coco_2014_minival",)',
               "DATASETS.TRAIN", '("coco_2014_minival",)'], "--eval-only needs MODEL.WEIGHTS")]
    for argv, message in cases:
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
