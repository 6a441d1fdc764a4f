"""Tests the checkpoint format: sgdet.save / sgdet.load round trips, bad files, atomic writes."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import sgdet
import sgdet.checkpoint as ckpt
from sgdet import CheckpointError

from conftest import PYTHON, REPO, is_compressed_type, make_densenet, make_lenet, make_resnet18


def _compressed_lenet(ratio=0.8):
    model = make_lenet()
    sgdet.compress(model, conv_ratio=ratio, fc_ratio=ratio, groups=8, step=None)
    return model.eval()


def _assert_same_structure(a: nn.Module, b: nn.Module) -> None:
    la, lb = sgdet.sg_layers(a), sgdet.sg_layers(b)
    assert la.keys() == lb.keys()
    for name in la:
        assert torch.equal(la[name].group, lb[name].group), name
        assert torch.equal(la[name].mask, lb[name].mask), name
        assert lb[name].check_invariant()


def _tmp_files(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f.startswith(".tmp-")]


def test_round_trip_masked(tmp_path):
    model = _compressed_lenet()
    path = tmp_path / "m.sg.pt"
    sgdet.save(model, path, meta={"note": "hello", "acc": 0.5})
    loaded = sgdet.load(path)
    assert loaded is not model
    assert isinstance(loaded.features[3], sgdet.SGConv2d)
    _assert_same_structure(model, loaded)
    x = torch.randn(3, 1, 28, 28)
    loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert loaded.sgdet_meta == {"note": "hello", "acc": 0.5}
    assert loaded.sgdet_arch == {"name": "lenet5", "kwargs": {"num_classes": 10, "in_channels": 1}}
    assert sgdet.count(loaded, (1, 28, 28)) == sgdet.count(model, (1, 28, 28))
    payload = torch.load(path, weights_only=True)
    assert payload["form"] == "masked" and payload["format"] == "sgdet-checkpoint"
    assert payload["modules"]["features.3"]["summary"]["groups"] == model.features[3].num_groups
    assert not _tmp_files(tmp_path)


def test_round_trip_deployed(tmp_path):
    model = _compressed_lenet(0.9)
    deployed = sgdet.deploy(model).eval()
    path = tmp_path / "d.sg.pt"
    sgdet.save(deployed, path)
    loaded = sgdet.load(path).eval()
    assert not any(is_compressed_type(m) for m in loaded.modules())
    for name in ("features.3", "classifier.1", "classifier.3"):
        a, b = deployed.get_submodule(name), loaded.get_submodule(name)
        assert type(b) is type(a)
        assert (a.group_out, a.group_in) == (b.group_out, b.group_in)
        assert torch.equal(a.in_index, b.in_index) and torch.equal(a.out_order, b.out_order)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(deployed(x), loaded(x))
    assert torch.load(path, weights_only=True)["form"] == "deployed"


def test_round_trip_deployed_densenet_with_skeleton(tmp_path):
    model = make_densenet()
    sgdet.compress(model, conv_ratio=0.9, fc_ratio=0.9, groups=8, step=None)
    deployed = sgdet.deploy(model).eval()
    assert any(isinstance(m, sgdet.GatheredBatchNorm2d) for m in deployed.modules())
    path = tmp_path / "dn.sg.pt"
    sgdet.save(deployed, path)
    with pytest.raises(CheckpointError, match="no registered architecture"):
        sgdet.load(path)
    loaded = sgdet.load(path, model=make_densenet(seed=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(deployed(x), loaded(x))
    gathered = [n for n, m in loaded.named_modules() if isinstance(m, sgdet.GatheredBatchNorm2d)]
    assert gathered == [n for n, m in deployed.named_modules() if isinstance(m, sgdet.GatheredBatchNorm2d)]


def test_load_in_a_fresh_process(tmp_path):
    model = _compressed_lenet()
    path = tmp_path / "fresh.sg.pt"
    sgdet.save(model, path)
    expected = float(model(torch.ones(1, 1, 28, 28)).detach().sum())
    code = (
        "import sys, torch, sgdet\n"
        "payload = torch.load(sys.argv[1], weights_only=True)\n"
        "assert payload['form'] == 'masked', payload['form']\n"
        "m = sgdet.load(sys.argv[1]).eval()\n"
        "print(type(m.features[3]).__name__)\n"
        "print(repr(float(m(torch.ones(1, 1, 28, 28)).sum())))\n"
    )
    result = subprocess.run([PYTHON, "-c", code, str(path)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    kind, value = result.stdout.split()
    assert kind == "SGConv2d"
    assert float(value) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_untagged_torchvision_model_is_recognised(tmp_path):
    model = make_resnet18()                 # torchvision.models.resnet18(num_classes=10) directly
    assert not hasattr(model, "sgdet_arch")
    sgdet.compress(model, conv_ratio=0.4, fc_ratio=0.4, groups=16, step=None)
    model.eval()
    path = tmp_path / "r.sg.pt"
    sgdet.save(model, path)
    assert torch.load(path, weights_only=True)["arch"] == {"name": "resnet18",
                                                           "kwargs": {"num_classes": 10}}
    loaded = sgdet.load(path).eval()
    _assert_same_structure(model, loaded)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), loaded(x))


def test_dense_model_round_trip_and_unknown_arch(tmp_path):
    dense = make_lenet()
    sgdet.save(dense, tmp_path / "dense.sg.pt")
    assert torch.load(tmp_path / "dense.sg.pt", weights_only=True)["form"] == "dense"
    loaded = sgdet.load(tmp_path / "dense.sg.pt")
    x = torch.randn(1, 1, 28, 28)
    assert torch.equal(loaded(x), dense(x))
    custom = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    sgdet.save(custom, tmp_path / "custom.sg.pt")
    with pytest.raises(CheckpointError, match="names no registered architecture"):
        sgdet.load(tmp_path / "custom.sg.pt")


# ---------------------------------------------------------------------------- bad files

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.sg.pt"
    sgdet.save(_compressed_lenet(0.5), path)
    return path


def _bad_files(tmp_path, good):
    data = good.read_bytes()
    files = {}
    files["truncated"] = tmp_path / "truncated.sg.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"] = tmp_path / "random.sg.pt"
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["empty"] = tmp_path / "empty.sg.pt"
    files["empty"].write_bytes(b"")
    files["state_dict"] = tmp_path / "foreign.pt"
    torch.save(make_lenet().state_dict(), files["state_dict"])
    files["pickled_module"] = tmp_path / "module.pt"
    torch.save(make_lenet(), files["pickled_module"])
    files["tensor"] = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), files["tensor"])
    files["missing"] = tmp_path / "does-not-exist.sg.pt"
    files["directory"] = tmp_path / "a-directory.sg.pt"
    files["directory"].mkdir()
    return files


@pytest.mark.parametrize("kind,phrase", [
    ("truncated", "not a safe sgdet checkpoint (truncated or corrupt"),
    ("random", "not a safe sgdet checkpoint (not a torch file"),
    ("empty", "not a safe sgdet checkpoint (truncated or corrupt"), ("state_dict", "not an sgdet checkpoint"),
    ("pickled_module", "not a safe sgdet checkpoint (it holds a pickled sgdet.models.LeNet5"),
    ("tensor", "not an sgdet checkpoint"),
    ("missing", "not found"), ("directory", ("not found", "directory")),
])
def test_bad_files_raise_checkpoint_error(tmp_path, good_file, kind, phrase):
    path = _bad_files(tmp_path, good_file)[kind]
    with pytest.raises(CheckpointError) as info:
        sgdet.load(path)
    message = str(info.value)
    phrases = phrase if isinstance(phrase, tuple) else (phrase,)
    assert any(p in message for p in phrases), message
    assert str(path) in message
    assert "\n" not in message and len(message) < 400
    assert not isinstance(info.value, (OSError, RuntimeError))


def _rewrite(path, edit):
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def test_newer_version_is_refused(good_file):
    _rewrite(good_file, lambda p: p.update(version=99))
    with pytest.raises(CheckpointError, match="version 99"):
        sgdet.load(good_file)


def test_missing_state_dict_is_damaged(good_file):
    _rewrite(good_file, lambda p: p.pop("state_dict"))
    with pytest.raises(CheckpointError, match="state_dict"):
        sgdet.load(good_file)


def test_broken_group_invariant_is_detected(good_file):
    def edit(payload):
        mask = payload["state_dict"]["classifier.1.mask"]
        group = payload["state_dict"]["classifier.1.group"]
        members = torch.nonzero(group == group[0]).flatten()
        assert members.numel() > 1
        mask[members[1]] = ~mask[members[1]]
    _rewrite(good_file, edit)
    with pytest.raises(CheckpointError, match="group invariant"):
        sgdet.load(good_file)


def test_wrong_skeleton_is_refused(good_file):
    with pytest.raises(CheckpointError, match="(does not fit|lacks|is not a)"):
        sgdet.load(good_file, model=make_resnet18())


# ---------------------------------------------------------------------------- atomic writes

def test_failed_save_leaves_nothing(tmp_path):
    model = _compressed_lenet(0.5)
    path = tmp_path / "out.sg.pt"
    with pytest.raises(Exception):
        sgdet.save(model, path, meta={"callback": lambda: None})   # not serialisable
    assert not path.exists()
    assert not _tmp_files(tmp_path)


class _Crash(BaseException):
    pass


def test_crash_midway_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    model = _compressed_lenet(0.5)
    path = tmp_path / "out.sg.pt"
    fresh = tmp_path / "fresh.sg.pt"
    sgdet.save(model, path, meta={"version": "old"})
    old_bytes = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        handle.flush()
        assert _tmp_files(tmp_path), "the write should go to a temporary file beside the target"
        raise _Crash()

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(_Crash):
        sgdet.save(model, path, meta={"version": "new"})
    with pytest.raises(_Crash):
        sgdet.save(model, fresh)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert path.read_bytes() == old_bytes
    assert sgdet.load(path).sgdet_meta == {"version": "old"}
    assert not fresh.exists()
    assert not _tmp_files(tmp_path)


def test_save_creates_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "m.sg.pt"
    sgdet.save(make_lenet(), path)
    assert path.is_file() and not _tmp_files(path.parent)


@pytest.mark.parametrize("value", [np.float64(0.9), np.int64(3)])
def test_meta_that_save_accepts_can_be_loaded(tmp_path, value):
    path = tmp_path / "meta.sg.pt"
    try:
        sgdet.save(make_lenet(), path, meta={"value": value})
    except sgdet.SGError:              # refusing up front, without a file, is also fine
        assert not path.exists()
        return
    assert sgdet.load(path).sgdet_meta["value"] == value
