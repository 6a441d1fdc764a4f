"""Bad input from issue 15, each a one-line error (or a logged count) instead of a traceback or
a silent wrong value: a NaN or negative COCO box, boxes clipped/dropped per dataset, a cyclic or
non-mapping config file."""
from __future__ import annotations

import json
import logging

import pytest

import sgdet
from sgdet.config import CfgNode, load_config
from sgdet.detection.datasets import COCODetection

from test_detection import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp("shapes")))


def _with_box(shapes, tmp_path, box) -> str:
    data = json.load(open(shapes[0]))
    data["annotations"][0]["bbox"] = box
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))               # json writes NaN as the bare token NaN
    return str(path)


@pytest.mark.parametrize("box", [[10, 10, float("nan"), 5], [10, 10, float("inf"), 5], [10, -3, 20, 5],
                                 [10, 10, 20, -1]])
def test_non_finite_or_negative_box_is_an_error_naming_the_annotation(shapes, tmp_path, box):
    path = _with_box(shapes, tmp_path, box)
    with pytest.raises(sgdet.DatasetError, match=r"annotation id 100 has a non-finite or negative bbox"):
        COCODetection(path, shapes[1])


def test_clipped_and_dropped_boxes_are_counted_and_logged(shapes, tmp_path, caplog):
    data = json.load(open(shapes[0]))
    size = data["images"][0]["width"]
    data["annotations"][0]["bbox"] = [size - 5, 2, 20, 10]       # reaches outside: clipped
    data["annotations"][1]["bbox"] = [size + 3, 2, 20, 10]       # starts outside: empty, dropped
    path = tmp_path / "clip.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="sgdet.detection"):
        ds = COCODetection(str(path), shapes[1])
    assert (ds.clipped, ds.dropped) == (1, 1)
    assert any("1 boxes clipped to their image, 1 dropped as empty" in r.getMessage() for r in caplog.records)
    boxes = ds[0][1]["boxes"]                                  # image 1 had only those two boxes
    assert boxes.shape[0] == 1 and float(boxes[0, 2]) == size   # the clipped one, at the edge


def _defaults() -> CfgNode:
    cfg = CfgNode()
    cfg.SOLVER = CfgNode()
    cfg.SOLVER.LR = 0.1
    return cfg


def test_cyclic_base_is_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\nSOLVER:\n  LR: 0.2\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(sgdet.ConfigError, match=r"_BASE_ cycle \(a\.yaml -> b\.yaml -> a\.yaml\)"):
        load_config(_defaults(), str(tmp_path / "a.yaml"))
    (tmp_path / "self.yaml").write_text("_BASE_: self.yaml\n")
    with pytest.raises(sgdet.ConfigError, match="_BASE_ cycle"):
        load_config(_defaults(), str(tmp_path / "self.yaml"))


@pytest.mark.parametrize("text, kind", [("just a string\n", "str"), ("- 1\n- 2\n", "list")])
def test_non_mapping_yaml_is_one_line(tmp_path, text, kind):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(sgdet.ConfigError, match=f"holds a YAML {kind}, not a mapping"):
        load_config(_defaults(), str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("_BASE_: c.yaml\n")            # also as somebody's base
    with pytest.raises(sgdet.ConfigError, match="not a mapping"):
        load_config(_defaults(), str(tmp_path / "d.yaml"))


def test_missing_base_names_the_child(tmp_path):
    (tmp_path / "e.yaml").write_text("_BASE_: gone.yaml\n")
    with pytest.raises(sgdet.ConfigError, match=r"config file not found: .*gone\.yaml \(the _BASE_ of"):
        load_config(_defaults(), str(tmp_path / "e.yaml"))
    cfg = load_config(_defaults(), None, ["SOLVER.LR", "0.3"])
    assert cfg.SOLVER.LR == 0.3


def test_table_columns_follow_the_test_sizes():
    from sgdet.detection.evaluation import format_table6
    row = {"model": "SG", "params": 24_000_000, "flops": 4_000_000_000, "ap": {"96": 12.5, "128": 20.0}}
    header, line = format_table6([row], sizes=["96", "128"]).splitlines()
    assert header.split()[-2:] == ["mAP(96)", "mAP(128)"] and line.split()[-2:] == ["12.5", "20.0"]
