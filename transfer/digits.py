"""Stage 1 of the transfer pipeline, for the worked example: scikit-learn's 8x8 handwritten digits
(1,797 real images it ships), upsampled to MODEL.INPUT_SIZE and normalised with Fashion-MNIST's
statistics so a LeNet-5 trained there sees inputs on the scale it knows. A fixed, stratified
60/40 train/test split (seeded by SEED), so every model of a table sees the same images."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

from sgdet.errors import ConfigError

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
TEST_FRACTION = 0.4


class LabelledTensors(TensorDataset):
    """A TensorDataset that knows its class names (what the transfer commands read)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
        super().__init__(images, labels)
        self.classes = list(classes)


def build_datasets(cfg) -> tuple[torch.utils.data.Dataset, LabelledTensors]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    channels, height, width = (int(v) for v in cfg.MODEL.INPUT_SIZE)
    if min(height, width) < 8:
        raise ConfigError(f"MODEL.INPUT_SIZE must be at least 8x8 for the digits, got {height}x{width}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0     # [N,1,8,8] in [0,1]
    images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    images = ((images - FASHION_MEAN) / FASHION_STD).expand(-1, channels, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=TEST_FRACTION,
                                           stratify=labels.numpy(), random_state=int(cfg.SEED))
    classes = [str(c) for c in digits.target_names]
    train = LabelledTensors(images[train_idx], labels[train_idx], classes)
    test = LabelledTensors(images[test_idx], labels[test_idx], classes)
    limit = int(cfg.DATA.LIMIT_TRAIN or 0)
    return (Subset(train, range(min(limit, len(train)))) if limit > 0 else train), test
