"""Transfer (Table 5): the CUB_200_2011 reader on a generated miniature tree (split, labels,
boxes, strict errors naming file and line, unreadable images skipped), fine-tuning with a new
dense head that keeps every other layer's groups and masks, the Params relation of Table 5 on
ResNet50, and the finetune / eval / table verbs. LeNet-5 on 28 px RGB crops keeps it fast."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import sgdet
from classification.datasets import collate_skipping_bad
from sgdet.engine.distributed import DistContext
from sgdet.errors import DatasetError
from transfer import commands, cub
from transfer.__main__ import main as cli, split_checkpoints
from transfer.head import find_head, replace_head, sg_structure, stem

CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
PER_CLASS, TRAIN_PER_CLASS = 4, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cub(parent, corrupt: bool = False) -> str:
    """A miniature CUB_200_2011/ in the official format: 3 classes x 4 JPEGs, 2 train + 2 test
    each, ids as the real files write them ("1 001.Black_footed_Albatross/..._0001_1.jpg")."""
    root = os.path.join(str(parent), "CUB_200_2011")
    gen = torch.Generator().manual_seed(0)
    images, labels, split, boxes = [], [], [], []
    for c, name in enumerate(CLASSES, 1):
        os.makedirs(os.path.join(root, "images", name), exist_ok=True)
        for k in range(PER_CLASS):
            i = len(images) + 1
            rel = f"{name}/{name.split('.')[1]}_{k + 1:04d}_{i}.jpg"
            pixels = (torch.rand(36, 44, 3, generator=gen) * 80 + 60 * c).clamp(0, 255).byte()
            Image.fromarray(pixels.numpy()).save(os.path.join(root, "images", rel), quality=90)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
            split.append(f"{i} {1 if k < TRAIN_PER_CLASS else 0}")
            boxes.append(f"{i} 2.0 3.0 30.0 28.0")
    files = {"images.txt": images, "image_class_labels.txt": labels, "train_test_split.txt": split,
             "classes.txt": [f"{c} {n}" for c, n in enumerate(CLASSES, 1)], "bounding_boxes.txt": boxes}
    for name, lines in files.items():
        with open(os.path.join(root, name), "w") as handle:
            handle.write("\n".join(lines) + "\n")
    if corrupt:       # a training image that exists but cannot be decoded
        with open(os.path.join(root, "images", images[0].split()[1]), "wb") as handle:
            handle.write(b"not a jpeg at all")
    return root


def write_config(folder, root: str, **extra) -> str:
    lines = ["DEVICE: cpu", f"OUTPUT_DIR: {os.path.join(str(folder), 'run')}",
             "MODEL:", "  ARCH: lenet5", "  NUM_CLASSES: 200", "  SOURCE_CLASSES: 10",
             "  INPUT_SIZE: [3, 28, 28]",
             "DATA:", "  NAME: cub200", f"  ROOT: {root}", "  TEST_RESIZE: 32", "  BATCH_SIZE: 3",
             "  TEST_BATCH_SIZE: 8", "  WORKERS: 0",
             "SOLVER:", "  EPOCHS: 1", "  LR: 0.01", "  EVAL_PERIOD: 0"]
    path = os.path.join(str(folder), "cub_test.yaml")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def compressed_lenet(path: str) -> nn.Module:
    """An 'ImageNet' source model: LeNet-5 for RGB, 10 classes, compressed (Conv-50/FC-50, g=2)."""
    torch.manual_seed(0)
    model = sgdet.build("lenet5", num_classes=10, in_channels=3)
    sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.5, groups=2, step=None, seed=0)
    sgdet.save(model, path, meta={"label": "LeNet-5-G (Conv-50/FC-50)"})
    return model


# ------------------------------------------------------------------------------------ dataset

def test_split_labels_and_boxes(tmp_path):
    root = make_cub(tmp_path)
    cfg = commands.load(write_config(tmp_path, root))
    train, test = cub.build_datasets(cfg)
    assert (len(train), len(test)) == (3 * TRAIN_PER_CLASS, 3 * (PER_CLASS - TRAIN_PER_CLASS))
    assert sorted(set(train.targets)) == [0, 1, 2] and test.classes == CLASSES
    assert all("_0001_" in p or "_0002_" in p for p, _, _ in train.samples)      # split honoured
    assert not any("_0001_" in p or "_0002_" in p for p, _, _ in test.samples)
    image, label = test[0]
    assert image.shape == (3, 28, 28) and label == 0
    assert commands.resolve_num_classes(cfg, (train, test)) == 200
    cfg0 = commands.load(write_config(tmp_path, root), ["MODEL.NUM_CLASSES", "0", "DATA.CROP_BOXES", "True"])
    assert commands.resolve_num_classes(cfg0, (train, test)) == 3
    boxed = cub.build_datasets(cfg0)[1]
    assert boxed.samples[0][2] == (2.0, 3.0, 32.0, 31.0) and boxed[0][0].shape == (3, 28, 28)


def _edit(root: str, name: str, line: int, text: str | None) -> None:
    path = os.path.join(root, name)
    lines = open(path).read().splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("name,line,text,expected", [
    ("image_class_labels.txt", 5, "55 2", "image_class_labels.txt line 5: image id 55 is not in images.txt"),
    ("train_test_split.txt", 7, None, "train_test_split.txt lacks image id 7 (images.txt line 7)"),
    ("images.txt", 3, "3 001.Black_footed_Albatross/missing.jpg", "images.txt line 3: image file"),
    ("images.txt", 2, "2", "images.txt line 2: expected 2 fields, got 1"),
    ("train_test_split.txt", 4, "4 1 0", "train_test_split.txt line 4: expected 2 fields, got 3"),
    ("image_class_labels.txt", 6, "x 1", "image_class_labels.txt line 6: id 'x' is not an integer"),
    ("images.txt", 4, "1 002.Laysan_Albatross/Laysan_Albatross_0001_5.jpg", "images.txt line 4: duplicate id 1"),
    ("image_class_labels.txt", 8, "8 9", "image_class_labels.txt line 8: class id 9 is not in classes.txt"),
    ("train_test_split.txt", 9, "9 2", "train_test_split.txt line 9: split flag must be one of [0, 1], got 2"),
])
def test_bad_layout_is_one_line_naming_file_and_line(tmp_path, name, line, text, expected):
    root = make_cub(tmp_path)
    _edit(root, name, line, text)
    with pytest.raises(DatasetError) as info:
        cub.CUBIndex(root)
    message = str(info.value)
    assert expected in message and "\n" not in message and root in message


def test_bad_boxes_and_missing_files(tmp_path):
    root = make_cub(tmp_path)
    _edit(root, "bounding_boxes.txt", 2, "2 1.0 1.0 -3.0 4.0")
    cub.CUBIndex(root)                      # boxes are only read with CROP_BOXES
    with pytest.raises(DatasetError, match=r"bounding_boxes.txt line 2: box .* width, height > 0"):
        cub.CUBIndex(root, crop_boxes=True)
    os.unlink(os.path.join(root, "classes.txt"))
    with pytest.raises(DatasetError, match=r"classes.txt not found; expected the official CUB_200_2011/"):
        cub.CUBIndex(root)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        cub.CUBIndex(os.path.join(str(tmp_path), "nowhere"))


def test_unreadable_image_is_skipped(tmp_path):
    root = make_cub(tmp_path, corrupt=True)
    train, _ = cub.build_datasets(commands.load(write_config(tmp_path, root)))
    assert train[0] is None and train.skipped == 1
    images, labels, skipped = collate_skipping_bad([train[0], train[1], train[2]])
    assert skipped == 1 and images.shape == (2, 3, 28, 28) and labels.tolist() == [0, 1]


# ----------------------------------------------------------------------------------- models

def test_find_head_names():
    with torch.device("meta"):
        assert find_head(torchvision.models.resnet18()) == "fc"
        assert find_head(torchvision.models.densenet121()) == "classifier"
        assert find_head(torchvision.models.vgg11()) == "classifier.6"
    assert find_head(sgdet.build("lenet5")) == "classifier.3"
    assert stem("out/r50_lg60.sg.pt") == "r50_lg60" and stem("baseline.pth") == "baseline"


def test_resnet50_params_relation_table5():
    """Table 5: ResNet50 Conv-60/FC-60 with a dense 200-way head is 11.47M (11.46M for L)."""
    torch.manual_seed(0)
    model = sgdet.build("resnet50")
    sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.6, groups=16, step=None, seed=0)
    compressed = sgdet.count_params(model)
    old = model.fc
    assert isinstance(old, sgdet.SGLinear)
    old_params = old.kept_connections() + old.bias.numel()
    structure = sg_structure(model)
    name, head = replace_head(model, 200)
    assert name == "fc" and type(head) is nn.Linear and head.out_features == 200
    params = sgdet.count_params(model)
    assert params == compressed - old_params + 2048 * 200 + 200
    assert abs(params / 11.47e6 - 1) < 0.015, params
    after = sg_structure(model)
    assert set(after) == set(structure) - {"fc"}
    assert all(torch.equal(after[n][1], structure[n][1]) for n in after)
    assert model.sgdet_arch["kwargs"]["num_classes"] == 200


# ------------------------------------------------------------------------------ fine-tuning

def test_finetune_keeps_groups_masks_and_zeros(tmp_path):
    root = make_cub(tmp_path, corrupt=True)
    source_path = os.path.join(str(tmp_path), "lenet_g50.sg.pt")
    source = compressed_lenet(source_path)
    before = sg_structure(source)
    config = write_config(tmp_path, root)
    cfg = commands.load(config, ["MODEL.WEIGHTS", source_path, "SOLVER.EPOCHS", "2"])
    trainer = commands.finetune(cfg, DistContext())
    model = trainer.model
    head = model.get_submodule("classifier.3")
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (500, 200)
    after = sg_structure(model)
    assert set(after) == set(before) - {"classifier.3"} and after
    for n, (group, mask) in after.items():
        assert torch.equal(group, before[n][0]) and torch.equal(mask, before[n][1])
        layer = model.get_submodule(n)
        assert float(layer.weight.detach()[~layer.weight_mask().expand_as(layer.weight)].abs().sum()) == 0.0
        assert not torch.equal(layer.weight.detach().cpu(), source.get_submodule(n).weight.detach())  # it trained
    row = trainer.state["final"]
    assert row["model"] == "LeNet-5-G (Conv-50/FC-50)" and row["params"] == sgdet.count_params(model)
    saved = sgdet.load(os.path.join(str(cfg.OUTPUT_DIR), "model_final.sg.pt"))
    assert saved.get_submodule("classifier.3").out_features == 200
    assert all(torch.equal(sg_structure(saved)[n][1], after[n][1]) for n in after)
    metrics = [json.loads(line) for line in open(os.path.join(str(cfg.OUTPUT_DIR), "metrics.jsonl"))]
    assert any(m.get("skipped") for m in metrics if m["event"] == "epoch")     # the bad JPEG
    # eval of the fine-tuned model (CLI), and of the ImageNet-head source (a clear error)
    assert cli(["eval", "--config", config, "MODEL.WEIGHTS",
                os.path.join(str(cfg.OUTPUT_DIR), "model_final.sg.pt"), "OUTPUT_DIR",
                os.path.join(str(tmp_path), "eval")]) == 0
    assert "LeNet-5-G (Conv-50/FC-50)" in open(os.path.join(str(tmp_path), "eval", "results.md")).read()
    assert cli(["eval", "--config", config, "MODEL.WEIGHTS", source_path]) == 2


def test_table_command_writes_table5(tmp_path, capsys):
    root = make_cub(tmp_path)
    masked = os.path.join(str(tmp_path), "lenet_g50.sg.pt")
    source = compressed_lenet(masked)
    deployed = os.path.join(str(tmp_path), "lenet_g50_deployed.sg.pt")
    sgdet.save(sgdet.deploy(source), deployed)
    torch.manual_seed(1)
    dense = os.path.join(str(tmp_path), "baseline.pth")
    torch.save(sgdet.build("lenet5", num_classes=10, in_channels=3).state_dict(), dense)
    out = os.path.join(str(tmp_path), "table")
    code = cli(["table", "--config", write_config(tmp_path, root), "--checkpoints", dense, masked,
                deployed, "--out", out, "OUTPUT_DIR", os.path.join(str(tmp_path), "runs")])
    assert code == 0, capsys.readouterr().err
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert table[0] == "| Model | Params | FLOPs | Top-1 (%) | Top-5 (%) |" and len(table) == 5
    assert table[2].startswith("| LeNet-5 baseline |") and table[3].startswith("| LeNet-5-G (Conv-50/FC-50) |")
    rows = json.load(open(os.path.join(out, "table.json")))["rows"]
    assert [os.path.basename(r["folder"]) for r in rows] == ["baseline", "lenet_g50", "lenet_g50_deployed"]
    # the deployed and the masked source give the same Params and FLOPs with the same new head
    assert (rows[1]["params"], rows[1]["flops"]) == (rows[2]["params"], rows[2]["flops"])
    assert rows[0]["params"] > rows[1]["params"]
    with open(os.path.join(out, "table.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_cli_errors_exit_2(tmp_path, capsys):
    root = make_cub(tmp_path)
    config = write_config(tmp_path, root)
    assert cli(["finetune", "--config", config, "SOLVER.NOT_A_KEY", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "transfer: error: command-line override: unknown config key SOLVER.NOT_A_KEY"
    _edit(root, "images.txt", 3, "3 nowhere/missing.jpg")
    assert cli(["finetune", "--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images.txt line 3: image file" in err[0]
    assert cli(["finetune", "--config", config, "DATA.NAME", "imagenet"]) == 2
    assert "unknown DATA.NAME 'imagenet'" in capsys.readouterr().err
    assert split_checkpoints(["a.pt", "b.pth", "DATA.ROOT", "/x"]) == (["a.pt", "b.pth"], ["DATA.ROOT", "/x"])


def test_shipped_configs_load():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "transfer")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            cfg = commands.load(os.path.join(folder, name))
            assert cfg.SOLVER.EPOCHS > 0
    r50 = commands.load(os.path.join(folder, "cub200_resnet50.yaml"))
    d201 = commands.load(os.path.join(folder, "cub200_densenet201.yaml"))
    assert (r50.MODEL.ARCH, d201.MODEL.ARCH) == ("resnet50", "densenet201")
    assert r50.SOLVER.dump() == d201.SOLVER.dump() and r50.MODEL.NUM_CLASSES == 200
