"""Detection: backbone registry, Faster R-CNN assembly, masks through detection training, COCO
datasets by name and the pycocotools evaluator. Images are 128 px so the suite stays fast."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os

import pytest
import torch
from PIL import Image, ImageDraw

import sgdet
from sgdet.detection.backbones import (BACKBONE_REGISTRY, PooledRoIHead, SingleFeatureBackbone,
                             build_backbone, registered_backbones)
from sgdet.detection import build_faster_rcnn, detector_counts
from sgdet.detection.datasets import (DATASET_CATALOG, COCODetection, RandomHorizontalFlip, collate,
                                  get_dataset, register_coco_dataset)
from sgdet.detection.evaluation import evaluate_coco, format_table6, format_table6_row, predict

CATEGORIES = [{"id": 3, "name": "box"}, {"id": 7, "name": "disc"}]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_shapes(folder, n_images: int = 6, size: int = 128, seed: int = 0):
    """A tiny COCO-format dataset: coloured rectangles (category 3) and discs (category 7)."""
    gen = torch.Generator().manual_seed(seed)
    images_dir = os.path.join(folder, "images")
    os.makedirs(images_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        image = Image.new("RGB", (size, size), (20, 20, 20))
        draw = ImageDraw.Draw(image)
        for k in range(2):
            w, h = (int(v) for v in torch.randint(16, 48, (2,), generator=gen))
            x, y = (int(v) for v in torch.randint(0, size - 48, (2,), generator=gen))
            colour = tuple(int(v) for v in torch.randint(80, 255, (3,), generator=gen))
            category = 3 if k == 0 else 7
            (draw.rectangle if category == 3 else draw.ellipse)([x, y, x + w, y + h], fill=colour)
            annotations.append({"id": 100 + len(annotations), "image_id": i + 1, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        name = f"img_{i:02d}.png"
        image.save(os.path.join(images_dir, name))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    json_file = os.path.join(folder, "instances.json")
    with open(json_file, "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, handle)
    return json_file, images_dir


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp("shapes")))


@pytest.fixture(scope="module")
def sg_checkpoint(tmp_path_factory):
    """A resnet50 compressed one-shot at Conv-60/FC-60, saved with sgdet.save."""
    torch.manual_seed(0)
    model = sgdet.build("resnet50")
    sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.6, groups=4, step=None, seed=0)
    path = str(tmp_path_factory.mktemp("ckpt") / "resnet50_c60.sg.pt")
    sgdet.save(model, path)
    return path


def _two_images():
    torch.manual_seed(1)
    images = [torch.rand(3, 128, 128), torch.rand(3, 112, 128)]
    targets = [{"boxes": torch.tensor([[10., 20., 70., 90.], [60., 5., 120., 50.]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[30., 30., 100., 100.]]), "labels": torch.tensor([2])}]
    return images, targets


def _sg_layers(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, sgdet.SGConv2d)}


# ----------------------------------------------------------------------------- registry

def test_registry_contents():
    names = set(registered_backbones())
    assert {"sg_resnet50", "sg_densenet201", "sg_resnet50_fpn", "sg_densenet201_fpn", "resnet50",
            "densenet201", "resnet50_fpn", "densenet201_fpn"} <= names


def test_unknown_backbone_lists_names():
    with pytest.raises(sgdet.ConfigError, match="unknown backbone 'sg_vgg16'.*sg_densenet201.*sg_resnet50"):
        build_backbone("sg_vgg16")


def _tiny_test_backbone(weights=None, **kwargs):
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=4, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 32, 3, stride=4, padding=1), torch.nn.ReLU())
    head = PooledRoIHead(torch.nn.Conv2d(32, 24, 3, stride=2, padding=1), 24)
    return SingleFeatureBackbone(body, out_channels=32, stride=16, box_head=head)


@pytest.fixture
def tiny_backbone():
    BACKBONE_REGISTRY.register(_tiny_test_backbone)
    yield "_tiny_test_backbone"
    BACKBONE_REGISTRY._obj_map.pop("_tiny_test_backbone", None)


def test_user_backbone_trains_in_faster_rcnn(tiny_backbone):
    assert tiny_backbone in registered_backbones()
    model = build_faster_rcnn(tiny_backbone, num_classes=3, min_size=128, max_size=128)
    assert model.backbone.box_head is None and model.roi_heads.box_head.representation_size == 24
    images, targets = _two_images()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()


def test_registry_docstring_example_headless_backbone():
    """The example of sgdet/backbones/registry.py's docstring: a backbone without a box head gets
    torchvision's TwoMLPHead over its single map."""
    import sgdet.detection.backbones.registry as registry
    source = registry.__doc__.split("::")[1]
    example = "\n".join(line[4:] for line in source.splitlines())
    namespace: dict = {}
    try:
        exec(compile(example, "registry-docstring", "exec"), namespace)
        detector = namespace["detector"]
        assert detector.roi_heads.box_head.__class__.__name__ == "TwoMLPHead"
        images, targets = _two_images()
        losses = detector(images, targets)
        sum(losses.values()).backward()
    finally:
        BACKBONE_REGISTRY._obj_map.pop("my_tiny_backbone", None)


def test_backbone_weight_errors(tmp_path):
    lenet = tmp_path / "lenet.sg.pt"
    sgdet.save(sgdet.build("lenet5"), lenet)
    with pytest.raises(sgdet.ConfigError, match="holds a LeNet5, not a ResNet"):
        build_backbone("sg_resnet50", weights=lenet)
    with pytest.raises(sgdet.CheckpointError, match="backbone weights not found: .*absent.pt"):
        build_backbone("sg_resnet50", weights=tmp_path / "absent.pt")
    with pytest.raises(sgdet.ConfigError, match="num_classes must be an integer >= 2"):
        build_faster_rcnn("sg_resnet50", num_classes=1)


def test_predict_then_evaluate_on_dataset(shapes, tiny_backbone):
    """Dataset -> detector in eval mode -> evaluator: the whole evaluation path runs."""
    torch.manual_seed(0)
    data = COCODetection(*shapes)
    model = build_faster_rcnn(tiny_backbone, num_classes=3, min_size=128, max_size=128,
                              box_score_thresh=0.0, rpn_post_nms_top_n_test=20)
    outputs = predict(model, data, batch_size=3)
    assert sorted(outputs) == [1, 2, 3, 4, 5, 6] and model.training
    boxes = torch.cat([o["boxes"] for o in outputs.values()])
    assert len(boxes) and float(boxes.max()) <= 128 and set(torch.cat(
        [o["labels"] for o in outputs.values()]).tolist()) <= {1, 2}
    metrics = evaluate_coco(outputs, data)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"} and 0 <= metrics["AP"] <= 100


# ----------------------------------------------------------------------------- Faster R-CNN

def test_masks_survive_detection_training(sg_checkpoint):
    torch.manual_seed(0)
    # few RoIs: the layer4 head runs once per RoI, which dominates the cost on a CPU
    model = build_faster_rcnn("sg_resnet50", num_classes=3, weights=sg_checkpoint, min_size=128,
                              max_size=128, roi_size=7, rpn_batch_size_per_image=64,
                              box_batch_size_per_image=8, rpn_pre_nms_top_n_test=50,
                              rpn_post_nms_top_n_test=10)
    backbone_sg, head_sg = _sg_layers(model.backbone), _sg_layers(model.roi_heads.box_head)
    assert backbone_sg and head_sg            # layer1..3 convs in the backbone, layer4 in the head
    assert model.backbone.out_channels == 1024 and model.roi_heads.box_head.representation_size == 2048
    layers = {**{"b." + k: v for k, v in backbone_sg.items()}, **{"h." + k: v for k, v in head_sg.items()}}
    masks = {n: m.mask.clone() for n, m in layers.items()}
    groups = {n: m.group.clone() for n, m in layers.items()}
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    assert all((m.weight[~m.weight_mask().expand_as(m.weight)] == 0).all() for m in layers.values())
    assert min(m.pruned_fraction() for n, m in layers.items()) > 0.5

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    images, targets = _two_images()
    for _ in range(2):                     # two steps: momentum and weight decay act too
        losses = model(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    changed = 0
    for name, layer in layers.items():
        assert torch.equal(layer.mask, masks[name]) and torch.equal(layer.group, groups[name]), name
        assert layer.check_invariant()
        pruned = ~layer.weight_mask().expand_as(layer.weight)
        assert (layer.weight.detach()[pruned] == 0).all(), f"{name}: a pruned weight moved"
        changed += int(not torch.equal(layer.weight.detach(), before[name]))
    assert changed >= len(layers) // 2      # the unfrozen SG layers did train

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}

    counts = detector_counts(model)
    assert 0 < counts["params"] < 0.7 * 24.3e6 and 0 < counts["flops"] < 0.7 * 4.09e9
    assert model.training is False         # counting kept the detector's mode


def _assert_same_features_and_head(masked, deployed):
    """The deployed backbone and box head reproduce the masked ones on a random image."""
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        a, b = masked(x)["0"], deployed(x)["0"]
        ha, hb = masked.box_head(a), deployed.box_head(b)
    assert torch.allclose(a, b, atol=1e-4 * max(1.0, float(a.abs().max())))
    assert torch.allclose(ha, hb, atol=1e-4 * max(1.0, float(ha.abs().max())))


def test_deployed_backbone_matches_masked(sg_checkpoint):
    masked = build_backbone("sg_resnet50", weights=sg_checkpoint).eval()
    deployed = build_backbone("sg_resnet50", weights=sg_checkpoint, deploy=True).eval()
    assert not _sg_layers(deployed) and any(isinstance(m, sgdet.DiverseGroupConv2d) for m in deployed.modules())
    _assert_same_features_and_head(masked, deployed)


def test_dense_backbone_refuses_masked_checkpoint(sg_checkpoint):
    with pytest.raises(sgdet.ConfigError, match="use the backbone 'sg_resnet50'"):
        build_backbone("resnet50", weights=sg_checkpoint)


def test_baseline_counts_match_table6():
    with torch.device("meta"):           # counting needs shapes only: no weights allocated
        resnet = detector_counts(build_faster_rcnn("resnet50", num_classes=81))
        densenet = build_faster_rcnn("densenet201", num_classes=81)
    assert round(resnet["flops"] / 1e9, 2) == 4.09          # Table 6 baseline: 4.09G
    assert abs(resnet["params"] / 1e6 - 24.44) < 0.15         # Table 6: 24.44M (ours 24.34M)
    assert densenet.backbone.out_channels == 1792
    assert densenet.roi_heads.box_head.representation_size == 1920
    counts = detector_counts(densenet)
    assert round(counts["flops"] / 1e9, 2) == 4.29          # Table 6 baseline: 4.29G
    assert abs(counts["params"] / 1e6 - 18.78) < 0.15         # Table 6: 18.78M (ours 18.87M)


def test_table6_formatting():
    row = format_table6_row("ResNet-G (Conv-60/FC-60)", 12_000_000, 1_910_000_000, 24.8, None)
    assert row.split()[-4:] == ["12.00M", "1.91G", "24.8", "-"]
    table = format_table6([{"model": "Baseline", "params": 24_440_000, "flops": 4_090_000_000,
                            "map300": 24.5, "map600": 30.9}])
    assert table.splitlines()[0].split() == ["Model", "Params", "FLOPs", "mAP(300)", "mAP(600)"]
    assert table.splitlines()[1].split() == ["Baseline", "24.44M", "4.09G", "24.5", "30.9"]


# ----------------------------------------------------------------------------- datasets

def test_dataset_items_and_contiguous_labels(shapes):
    json_file, image_root = shapes
    data = COCODetection(json_file, image_root)
    assert len(data) == 6 and data.label_to_category == {1: 3, 2: 7}
    image, target = data[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32 and float(image.max()) <= 1
    assert target["image_id"] == 1 and target["labels"].tolist() == [1, 2]
    raw = json.load(open(json_file))["annotations"][0]["bbox"]
    x, y, w, h = raw
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    images, targets = collate([data[0], data[1]])
    assert len(images) == len(targets) == 2


def test_random_horizontal_flip(shapes):
    data = COCODetection(*shapes)
    image, target = data[0]
    flipped, moved = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped, image.flip(-1))
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    assert moved["boxes"][0].tolist() == [128 - x1, y0, 128 - x0, y1]
    assert torch.equal(target["boxes"], data[0][1]["boxes"])     # the input target is untouched
    same, kept = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and kept is target


def test_dataset_catalog(shapes, tmp_path, monkeypatch):
    assert {"coco_2014_trainval_minus_minival", "coco_2014_minival"} <= set(DATASET_CATALOG)
    trainval = DATASET_CATALOG["coco_2014_trainval_minus_minival"]
    assert [j for j, _ in trainval] == ["coco/annotations/instances_train2014.json",
                                        "coco/annotations/instances_valminusminival2014.json"]
    monkeypatch.setenv("SGDET_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(sgdet.DatasetError, match="datasets root not found: .*nowhere"):
        get_dataset("coco_2014_minival")
    os.makedirs(tmp_path / "nowhere")
    with pytest.raises(sgdet.DatasetError, match="annotation file not found: .*instances_minival2014.json"):
        get_dataset("coco_2014_minival")
    with pytest.raises(sgdet.ConfigError, match="unknown dataset 'nope'.*coco_2014_minival"):
        get_dataset("nope")
    register_coco_dataset("_test_shapes", *shapes)
    try:
        assert len(get_dataset("_test_shapes")) == 6
    finally:
        DATASET_CATALOG.pop("_test_shapes")


def _write(path, data):
    with open(path, "w") as handle:
        handle.write(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_malformed_json(shapes, tmp_path):
    path = _write(tmp_path / "bad.json", '{"images": [1, 2,')
    with pytest.raises(sgdet.DatasetError, match=r"bad\.json: malformed JSON at line 1"):
        COCODetection(path, shapes[1])
    path = _write(tmp_path / "list.json", {"images": []})
    with pytest.raises(sgdet.DatasetError, match=r"list\.json: missing 'annotations' list"):
        COCODetection(path, shapes[1])


def test_missing_image(shapes, tmp_path):
    data = json.load(open(shapes[0]))
    data["images"][2]["file_name"] = "gone.png"
    path = _write(tmp_path / "missing.json", data)
    with pytest.raises(sgdet.DatasetError, match=r"image file not found: .*gone\.png \(image id 3"):
        COCODetection(path, shapes[1])
    lazy = COCODetection(path, shapes[1], check_images=False)
    with pytest.raises(sgdet.DatasetError, match=r"gone\.png"):
        lazy[2]


def test_unknown_category_id(shapes, tmp_path):
    data = json.load(open(shapes[0]))
    data["annotations"][3]["category_id"] = 5
    path = _write(tmp_path / "cats.json", data)
    with pytest.raises(sgdet.DatasetError, match=r"cats\.json: annotation id 103 has unknown category_id 5"):
        COCODetection(path, shapes[1])


# ----------------------------------------------------------------------------- evaluation

def _noisy_detections(data: COCODetection, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    detections = {}
    for i in range(len(data)):
        target = data._target(data.images[i], 128, 128)
        boxes = target["boxes"] + torch.randn(target["boxes"].shape, generator=gen) * 4
        labels = target["labels"].clone()
        labels[torch.rand(len(labels), generator=gen) < 0.2] = 1      # some wrong classes
        extra = torch.rand(2, 2, generator=gen) * 60
        boxes = torch.cat([boxes, torch.cat([extra, extra + 30], 1)])  # false positives
        labels = torch.cat([labels, torch.tensor([1, 2])])
        scores = torch.rand(len(boxes), generator=gen)
        detections[data.images[i]["id"]] = {"boxes": boxes, "scores": scores, "labels": labels}
    return detections


def test_evaluator_matches_cocoeval(shapes, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    data = COCODetection(*shapes)
    detections = _noisy_detections(data)
    out = tmp_path / "results.json"
    ours = evaluate_coco(detections, data, output_json=out)
    with contextlib.redirect_stdout(io.StringIO()):      # pycocotools directly, by hand
        gt = COCO(shapes[0])
        results = []
        for image_id, det in detections.items():
            for (x0, y0, x1, y1), s, l in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                results.append({"image_id": image_id, "category_id": {1: 3, 2: 7}[l],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate(); evaluator.accumulate(); evaluator.summarize()
    for key, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), evaluator.stats[:6]):
        expected = 100 * value if value >= 0 else math.nan
        assert ours[key] == pytest.approx(expected, abs=1e-9, nan_ok=True), key
    assert 0 < ours["AP"] < 100
    written = json.load(open(out))
    assert len(written) == len(results) and {r["category_id"] for r in written} == {3, 7}
    assert evaluate_coco(detections, shapes[0])["AP"] == pytest.approx(ours["AP"])   # json path


def test_evaluator_perfect_and_empty(shapes):
    data = COCODetection(*shapes)
    perfect = {}
    for i in range(len(data)):
        target = data._target(data.images[i], 128, 128)
        perfect[target["image_id"]] = {"boxes": target["boxes"], "labels": target["labels"],
                                       "scores": torch.ones(len(target["labels"]))}
    metrics = evaluate_coco(perfect, data)
    assert metrics["AP"] == pytest.approx(100) and metrics["AP50"] == pytest.approx(100)
    assert evaluate_coco({}, data)["AP"] == 0.0
    with pytest.raises(sgdet.ConfigError, match="label 9 has no COCO category"):
        evaluate_coco({1: {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([9])}}, data)


def test_detector_save_load_roundtrip(sg_checkpoint, tmp_path):
    torch.manual_seed(0)
    model = build_faster_rcnn("sg_resnet50", num_classes=3, weights=sg_checkpoint, min_size=128,
                              max_size=128, roi_size=7, rpn_pre_nms_top_n_test=50,
                              rpn_post_nms_top_n_test=10, box_score_thresh=0.0).eval()
    path = tmp_path / "detector.sg.pt"
    sgdet.save(model, path)
    loaded = sgdet.load(path).eval()          # rebuilt from the checkpoint alone
    assert type(loaded).__name__ == "FasterRCNN" and loaded.rpn._post_nms_top_n["testing"] == 10
    for name, layer in _sg_layers(model).items():
        twin = loaded.get_submodule(name)
        assert isinstance(twin, sgdet.SGConv2d) and torch.equal(twin.mask, layer.mask)
    images, _ = _two_images()
    with torch.no_grad():
        a, b = model(images), loaded(images)
    assert torch.allclose(a[0]["boxes"], b[0]["boxes"], atol=1e-3)
    assert torch.allclose(a[0]["scores"], b[0]["scores"], atol=1e-5)


def test_fpn_layout_trains_with_masks(sg_checkpoint):
    torch.manual_seed(0)
    model = build_faster_rcnn("sg_resnet50_fpn", num_classes=3, weights=sg_checkpoint, min_size=128,
                              max_size=128, box_batch_size_per_image=16)
    assert model.backbone.output_shape() == {"0": (256, 4), "1": (256, 8), "2": (256, 16),
                                             "3": (256, 32), "pool": (256, 64)}
    layers = _sg_layers(model.backbone)
    masks = {n: m.mask.clone() for n, m in layers.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = _two_images()
    loss = sum(model(images, targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name, layer in layers.items():
        assert torch.equal(layer.mask, masks[name])
        assert (layer.weight.detach()[~layer.weight_mask().expand_as(layer.weight)] == 0).all(), name
    counts = detector_counts(model)
    assert counts["params"] < counts["total_params"] and counts["flops"] > 0


@pytest.mark.slow
def test_densenet_c4_split_and_deploy(tmp_path):
    """sg_densenet201 cuts any torchvision DenseNet checkpoint (densenet121 here, to stay small):
    body up to denseblock3, head transition3..norm5; the deployed form gives the same outputs."""
    torch.manual_seed(0)
    net = sgdet.build("densenet121")
    sgdet.compress(net, conv_ratio=0.6, fc_ratio=0.6, groups=4, step=None, seed=0)
    path = tmp_path / "d121.sg.pt"
    sgdet.save(net, path)
    masked = build_backbone("sg_densenet201", weights=path).eval()
    deployed = build_backbone("sg_densenet201", weights=path, deploy=True).eval()
    assert masked.out_channels == 1024 and masked.box_head.representation_size == 1024  # densenet121
    assert any(isinstance(m, sgdet.GatheredBatchNorm2d) for m in deployed.box_head.modules())
    _assert_same_features_and_head(masked, deployed)
