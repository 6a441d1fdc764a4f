"""The classification data loaders and the `make demo` job, end to end on generated idx files."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import sgdet
from classification.mnist import find_mnist_root, load_mnist_style
from sgdet.errors import DatasetError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx_gz(folder, n_train=512, n_test=256, seed=0):
    """Fashion-MNIST-format files whose classes are learnable: class c brightens row band c."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 250
        with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return folder


@pytest.fixture
def idx_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SGDET_CACHE", str(tmp_path / "cache"))
    return write_idx_gz(str(tmp_path / "fashion"))


def test_loader_reads_idx_gz_through_torchvision(idx_folder, tmp_path):
    train, test = load_mnist_style("fashion-mnist", idx_folder)
    assert train.images.shape == (512, 1, 28, 28) and test.images.shape == (256, 1, 28, 28)
    assert train.labels.dtype == torch.long and int(train.labels.max()) <= 9
    # extracted once into the cache in torchvision's layout, which --data also accepts
    cached = os.path.join(tmp_path, "cache", "fashion-mnist")
    assert os.path.isfile(os.path.join(cached, "FashionMNIST", "raw", "train-images-idx3-ubyte"))
    again, _ = load_mnist_style("fashion-mnist", cached)
    assert torch.equal(again.images, train.images)


def test_missing_or_wrong_folders_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SGDET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match="not found"):
        find_mnist_root("fashion-mnist", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        find_mnist_root("fashion-mnist", str(tmp_path / "empty"))


def test_demo_end_to_end(idx_folder, tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "classification", "demo", "--data", idx_folder, "--out", str(out),
           "--epochs", "2", "--levels", "0.5", "0.75", "--step", "0.25", "--local-steps", "3",
           "--finetune-epochs", "1", "--groups", "4", "--lr", "0.05"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    # stdout is a pipe (`make demo | tee log`): progress comes as log lines on stdout, no bars
    assert "self-grouping step 1/3: conv 25%, FC 25% pruned" in done.stdout
    assert "self-grouping step 3/3" in done.stdout and " it/s  eta " in done.stdout
    assert "\r" not in done.stdout + done.stderr
    assert "self-grouping step 3/3" in (out / "log.txt").read_text()
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["model"] for r in rows] == ["LeNet-5 baseline", "LeNet-5 (Conv-50/FC-50)",
                                          "LeNet-5 (Conv-75/FC-75)"]
    assert rows[0]["params"] == 431080
    assert rows[0]["top1"] > 50          # the generated classes are easy: training really learned
    for row in rows[1:]:
        assert row["deployed_top1"] == pytest.approx(row["top1"], abs=0.5)
        assert row["params"] < rows[0]["params"] and row["flops"] < rows[0]["flops"]
    assert rows[2]["params"] < rows[1]["params"]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["conv_target"] for s in steps] == [0.25, 0.5, 0.75]
    assert "| LeNet-5 (Conv-75/FC-75) |" in (out / "results.md").read_text()
    assert json.loads((out / "config.json").read_text())["groups"] == 4
    assert "| LeNet-5 (Conv-75/FC-75) |" in done.stdout
    # checkpoints reload, masked and deployed agree, and the picture is a real PNG
    masked = sgdet.load(str(out / "lenet5_conv75_fc75.sg.pt")).eval()
    deployed = sgdet.load(str(out / "lenet5_conv75_fc75_deployed.sg.pt")).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), masked(x), rtol=1e-4, atol=1e-5)
    assert sgdet.count(masked, (1, 28, 28))["params"] == rows[2]["params"]
    import matplotlib.image
    picture = matplotlib.image.imread(str(out / "group_structure.png"))
    assert picture.ndim == 3 and picture.shape[0] > 300
    assert not [p for p in os.listdir(out) if p.startswith(".tmp") or p.endswith(".tmp")]


def test_demo_rejects_levels_off_the_step_grid(idx_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "classification", "demo", "--data", idx_folder,
                           "--out", str(tmp_path / "o"), "--levels", "0.5", "--step", "0.4"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "not a multiple of --step" in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_without_data_says_how_to_get_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "SGDET_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "classification", "demo", "--data",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "dataset folder not found" in done.stderr
    assert "Traceback" not in done.stderr
