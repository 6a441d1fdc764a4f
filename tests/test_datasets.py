"""classification.datasets on generated data: an ImageFolder tree with corrupt images, fake CIFAR-10/
100 batches in torchvision's pickle format, and MNIST-style idx.gz files."""
from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from classification import datasets
from classification.config import get_defaults
from sgdet.errors import ConfigError, DatasetError
from test_demo import write_idx_gz

CLASSES = ("cat", "dog", "emu")


def _cfg(name, root, size=32, limit=0):
    cfg = get_defaults()
    cfg.DATA.NAME = name
    cfg.DATA.ROOT = str(root)
    cfg.DATA.LIMIT_TRAIN = limit
    cfg.MODEL.INPUT_SIZE = [3, size, size]
    return cfg


def _image(path, seed, size=(40, 40), colour=None):
    if colour is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        pixels = np.broadcast_to(np.array(colour, dtype=np.uint8), (size[1], size[0], 3)).copy()
    Image.fromarray(pixels).save(path)


def _truncated_jpeg(path, seed):
    _image(path, seed)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


# train: per class 2 JPEG + 1 PNG good; bad: cat/truncated.jpg, dog/empty.jpg, emu/text.jpg
TRAIN_BAD = ("cat/truncated.jpg", "dog/empty.jpg", "emu/text.jpg")
N_TRAIN_GOOD, N_VAL_GOOD = 9, 6


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "imgs"
    seed = 0
    for split, n_good in (("train", 3), ("val", 2)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n_good):
                seed += 1
                _image(folder / f"{i}.{'png' if i == 2 else 'jpg'}", seed,
                       size=(40 + 8 * i, 40))          # non-square too
    _truncated_jpeg(root / "train" / TRAIN_BAD[0], 99)
    (root / "train" / TRAIN_BAD[1]).write_bytes(b"")
    (root / "train" / TRAIN_BAD[2]).write_text("this is not an image\n")
    (root / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def _drain(dataset, workers=0, batch_size=4):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=datasets.collate_skipping_bad)
    images, labels, skipped = [], [], 0
    for batch in loader:
        assert len(batch) == 3
        x, y, n = batch
        assert isinstance(n, int)
        skipped += n
        if y.numel():
            images.append(x)
            labels.append(y)
    return torch.cat(images), torch.cat(labels), skipped


# ------------------------------------------------------------------------------------ ImageFolder

@pytest.mark.parametrize("name", ["imagenet", "imagefolder"])
def test_imagefolder_builds_train_and_val(image_root, name):
    cfg = _cfg(name, image_root, size=32)
    train, val = datasets.build_datasets(cfg)
    assert len(train) == N_TRAIN_GOOD + len(TRAIN_BAD) and len(val) == N_VAL_GOOD + 1
    assert train.classes == val.classes == list(CLASSES)
    assert datasets.num_classes_of(cfg) == 3
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    x, y = val[len(val) - 1]
    assert x.shape == (3, 32, 32) and y == 2


def test_corrupt_images_are_skipped_counted_and_logged(image_root, caplog):
    train, val = datasets.build_datasets(_cfg("imagenet", image_root))
    with caplog.at_level(logging.WARNING, logger="classification.datasets"):
        images, labels, skipped = _drain(train)
    assert skipped == len(TRAIN_BAD) == datasets.skipped_count(train)
    assert images.shape == (N_TRAIN_GOOD, 3, 32, 32) and labels.dtype == torch.long
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for bad in TRAIN_BAD:
        assert any(os.path.join(*bad.split("/")) in r.getMessage() for r in caplog.records), bad
    assert {os.path.relpath(p, image_root / "train") for p in train.bad_files} == set(TRAIN_BAD)
    _, val_labels, val_skipped = _drain(val)
    assert val_skipped == 1 and val_labels.numel() == N_VAL_GOOD


def test_skip_count_travels_with_batches_from_workers(image_root):
    train, _ = datasets.build_datasets(_cfg("imagenet", image_root, limit=0))
    images, _, skipped = _drain(train, workers=2, batch_size=3)
    assert skipped == len(TRAIN_BAD) and images.shape[0] == N_TRAIN_GOOD


def test_collate_of_an_all_bad_batch_is_empty():
    x, y, n = datasets.collate_skipping_bad([None, None])
    assert n == 2 and x.numel() == 0 and y.numel() == 0 and y.dtype == torch.long
    x, y, n = datasets.collate_skipping_bad([(torch.ones(1, 2, 2), 3), None, (torch.zeros(1, 2, 2), 1)])
    assert n == 1 and x.shape == (2, 1, 2, 2) and y.tolist() == [3, 1] and y.dtype == torch.long


def test_val_is_normalised_with_imagenet_stats(tmp_path):
    root = tmp_path / "solid"
    colour = (255, 0, 128)
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        _image(root / split / "a" / "x.png", 0, size=(50, 40), colour=colour)
    _, val = datasets.build_datasets(_cfg("imagenet", root, size=16))
    x, _ = val[0]
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)]
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x.mean((1, 2)), torch.tensor(expected), atol=1e-4)


def test_crop_sizes_follow_the_input_size():
    for size, resize in ((224, 256), (32, 37), (16, 18)):
        train, val = datasets.imagefolder_transforms(size)
        names = [type(t).__name__ for t in train.transforms]
        assert names[:3] == ["Resize", "RandomCrop", "RandomHorizontalFlip"]
        assert train.transforms[0].size == resize and train.transforms[1].size == (size, size)
        assert [type(t).__name__ for t in val.transforms][:2] == ["Resize", "CenterCrop"]
        assert val.transforms[0].size == resize and val.transforms[1].size == (size, size)


def test_train_augmentation_is_random(image_root):
    train, val = datasets.build_datasets(_cfg("imagenet", image_root, size=32))
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(val[0][0], val[0][0])


def test_limit_train_keeps_the_first_samples(image_root):
    train, val = datasets.build_datasets(_cfg("imagenet", image_root, limit=4))
    assert isinstance(train, Subset) and list(train.indices) == [0, 1, 2, 3]
    assert [train[i][1] for i in range(3)] == [0, 0, 0] and len(val) == N_VAL_GOOD + 1
    assert train[3] is None                                   # cat/truncated.jpg sorts fourth
    _, labels, skipped = _drain(train)
    assert labels.tolist() == [0, 0, 0] and skipped == 1
    big, _ = datasets.build_datasets(_cfg("imagenet", image_root, limit=10_000))
    assert len(big) == N_TRAIN_GOOD + len(TRAIN_BAD)
    with pytest.raises(ConfigError, match="LIMIT_TRAIN"):
        datasets.build_datasets(_cfg("imagenet", image_root, limit=-1))


def test_imagefolder_layout_errors(tmp_path, image_root):
    with pytest.raises(DatasetError, match="not found: .*nowhere.*expected layout"):
        datasets.build_datasets(_cfg("imagenet", tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="DATA.ROOT is not set"):
        datasets.build_datasets(_cfg("imagenet", ""))
    only_train = tmp_path / "only_train"
    (only_train / "train" / "a").mkdir(parents=True)
    _image(only_train / "train" / "a" / "x.jpg", 1)
    with pytest.raises(DatasetError, match=r"only_train.val is missing; expected layout: <ROOT>/train/<class>"):
        datasets.build_datasets(_cfg("imagenet", only_train))
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    _image(flat / "train" / "x.jpg", 1)
    with pytest.raises(DatasetError, match=r"flat.train has no class folders"):
        datasets.build_datasets(_cfg("imagenet", flat))
    with pytest.raises(DatasetError, match=r"flat.train has no class folders"):
        datasets.num_classes_of(_cfg("imagenet", flat))
    (image_root / "train" / "fox").mkdir()                       # empty class folder
    with pytest.raises(DatasetError, match=r"only in train: fox"):
        datasets.build_datasets(_cfg("imagenet", image_root))
    (image_root / "val" / "fox").mkdir()
    with pytest.raises(DatasetError, match=r"imgs.train: .*fox.*expected layout"):
        datasets.build_datasets(_cfg("imagenet", image_root))


def test_unknown_dataset_name(image_root):
    with pytest.raises(ConfigError, match="unknown DATA.NAME 'svhn'"):
        datasets.build_datasets(_cfg("svhn", image_root))


# ------------------------------------------------------------------------------------------ CIFAR

def write_fake_cifar(root, name="cifar10", n_per_batch=4, n_test=6, seed=0):
    """Tiny CIFAR files in the real python-version pickle format; returns {file: (data, labels)}."""
    rng = np.random.default_rng(seed)
    hundred = name == "cifar100"
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    n_classes = 100 if hundred else 10
    files = {"train": 5 * n_per_batch, "test": n_test} if hundred else \
        {**{f"data_batch_{i}": n_per_batch for i in range(1, 6)}, "test_batch": n_test}
    written = {}
    for fname, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, n_classes, n)]
        entry = {"batch_label": fname, "data": data, "filenames": [f"{fname}_{i}.png" for i in range(n)]}
        if hundred:
            entry.update(fine_labels=labels, coarse_labels=[v // 5 for v in labels])
        else:
            entry["labels"] = labels
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[fname] = (data, labels)
    if hundred:
        meta = {"fine_label_names": [f"fine{i}" for i in range(100)],
                "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    else:
        meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_per_batch,
                "num_vis": 3072}
    with open(os.path.join(folder, "meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder, written


@pytest.mark.parametrize("name,test_file,train_file", [("cifar10", "test_batch", "data_batch_3"),
                                                       ("cifar100", "test", "train")])
def test_fake_cifar_reads_through_torchvision(tmp_path, name, test_file, train_file):
    _, written = write_fake_cifar(str(tmp_path), name)
    cfg = _cfg(name, tmp_path)
    train, val = datasets.build_datasets(cfg)
    assert len(train) == 20 and len(val) == 6
    assert datasets.num_classes_of(cfg) == (100 if name == "cifar100" else 10)
    assert len(train.classes) == datasets.num_classes_of(cfg)
    data, labels = written[test_file]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in datasets.CIFAR_STATS[name])
    for i in (0, 5):
        x, y = val[i]
        expected = (torch.from_numpy(data[i].reshape(3, 32, 32)).float() / 255 - mean) / std
        assert x.shape == (3, 32, 32) and y == labels[i]
        assert torch.allclose(x, expected, atol=1e-5)
    offset = 8 if name == "cifar10" else 0          # data_batch_3 starts at sample 8
    x, y = train[offset + 1]
    assert x.shape == (3, 32, 32) and y == written[train_file][1][1]
    images, labels_seen, skipped = _drain(train, batch_size=8)
    assert skipped == 0 and images.shape == (20, 3, 32, 32)


def test_cifar_train_augmentation_pads_crops_and_flips(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10")
    train, _ = datasets.build_datasets(_cfg("cifar10", tmp_path))
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert train.transform.transforms[0].padding == 4 and train.transform.transforms[0].size == (32, 32)
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_cifar_limit_train(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar100")
    train, val = datasets.build_datasets(_cfg("cifar100", tmp_path, limit=7))
    assert len(train) == 7 and len(val) == 6


def test_cifar_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py lacks data_batch_1.*torchvision's layout"):
        datasets.build_datasets(_cfg("cifar10", tmp_path))
    folder, _ = write_fake_cifar(str(tmp_path), "cifar10")
    os.remove(os.path.join(folder, "batches.meta"))
    with pytest.raises(DatasetError, match="lacks batches.meta"):
        datasets.build_datasets(_cfg("cifar10", tmp_path))
    folder, _ = write_fake_cifar(str(tmp_path), "cifar10")
    path = os.path.join(folder, "data_batch_2")
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 3])
    with pytest.raises(DatasetError, match="cannot read cifar10 from .*cifar-10-batches-py"):
        datasets.build_datasets(_cfg("cifar10", tmp_path))
    with pytest.raises(DatasetError, match="cifar-100-python lacks train, test, meta; "):
        datasets.build_datasets(_cfg("cifar100", tmp_path))
    with pytest.raises(DatasetError, match="dataset folder not found"):
        datasets.build_datasets(_cfg("cifar100", tmp_path / "absent"))


def test_cifar_labels_out_of_range_are_rejected(tmp_path):
    folder, _ = write_fake_cifar(str(tmp_path), "cifar10")
    path = os.path.join(folder, "test_batch")
    entry = pickle.load(open(path, "rb"))
    entry["labels"][0] = 10
    pickle.dump(entry, open(path, "wb"), protocol=2)
    with pytest.raises(DatasetError, match=r"outside 0..9"):
        datasets.build_datasets(_cfg("cifar10", tmp_path))


# ---------------------------------------------------------------------------------------- MNIST

@pytest.mark.parametrize("name,stats", [("fashion-mnist", (0.2860, 0.3530)), ("mnist", (0.1307, 0.3081))])
def test_mnist_style_datasets_yield_normalised_tensors(tmp_path, monkeypatch, name, stats):
    monkeypatch.setenv("SGDET_CACHE", str(tmp_path / "cache"))
    folder = write_idx_gz(str(tmp_path / "idx"), n_train=40, n_test=20)
    cfg = _cfg(name, folder, limit=30)
    cfg.MODEL.INPUT_SIZE = [1, 28, 28]
    train, val = datasets.build_datasets(cfg)
    assert len(train) == 30 and len(val) == 20 and datasets.num_classes_of(cfg) == 10
    x, y = val[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    raw = x * stats[1] + stats[0]                       # undo the normalisation
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    row = 2 + 2 * int(y)                                # write_idx_gz brightens this band
    assert torch.allclose(raw[0, row, 4:24], torch.full((20,), 250 / 255), atol=1e-5)
    images, labels, skipped = _drain(train, batch_size=16)
    assert skipped == 0 and images.shape == (30, 1, 28, 28) and labels.dtype == torch.long


def test_mnist_resized_to_the_model_input(tmp_path, monkeypatch):
    """MODEL.INPUT_SIZE [3, 64, 64] (a torchvision ResNet on Fashion-MNIST): bilinear upsampling,
    grey repeated into three equal planes, labels untouched; other channel counts are refused."""
    monkeypatch.setenv("SGDET_CACHE", str(tmp_path / "cache"))
    folder = write_idx_gz(str(tmp_path / "idx"), n_train=40, n_test=20)
    small = _cfg("fashion-mnist", folder)
    small.MODEL.INPUT_SIZE = [1, 28, 28]
    _, val28 = datasets.build_datasets(small)
    train, val = datasets.build_datasets(_cfg("fashion-mnist", folder, size=64))
    x, y = val[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == val28[3][1]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    expected = torch.nn.functional.interpolate(val28[3][0][None], size=(64, 64), mode="bilinear")[0, 0]
    assert torch.allclose(x[0], expected)
    images, labels, skipped = _drain(train, batch_size=16)
    assert images.shape == (40, 3, 64, 64) and labels.shape == (40,) and skipped == 0
    bad = _cfg("fashion-mnist", folder)
    bad.MODEL.INPUT_SIZE = [2, 28, 28]
    with pytest.raises(ConfigError, match=r"INPUT_SIZE\[0\] must be 1 or 3"):
        datasets.build_datasets(bad)


def test_mnist_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        datasets.build_datasets(_cfg("mnist", tmp_path / "absent"))
