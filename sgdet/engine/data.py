"""Engine stage: how the one Trainer feeds data, for every pipeline. The skipping collate (a
dataset may return ``None`` for an unreadable sample; it is dropped and counted), the exact
evaluation shard sampler and the resumable training sampler (a run resumed inside an epoch sees
the rest of that epoch's order)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset
from torch.utils.data.dataloader import default_collate


def collate_skipping_bad(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Default collation of the good samples of ``batch``; ``None`` samples (unreadable images)
    are dropped. Always returns ``(images, labels, n_skipped)``, also when nothing is left."""
    good = [sample for sample in batch if sample is not None]
    n_skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), n_skipped
    images, labels = default_collate(good)
    return images, torch.as_tensor(labels, dtype=torch.long), n_skipped


def base_dataset(ds: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def may_yield_none(ds: Dataset | None) -> bool:
    """Whether ``ds`` may yield ``None`` samples (its class sets ``may_skip = True``)."""
    return ds is not None and bool(getattr(base_dataset(ds), "may_skip", False))


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of a dataset: an exact partition for evaluation (unlike
    DistributedSampler, nothing is padded or repeated)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first ``skip`` samples: a run resumed
    from a checkpoint inside an epoch sees the rest of that epoch's order, not a new one."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip
