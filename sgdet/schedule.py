"""The one schedule of Algorithm 1, shared by ``sgdet.compress`` and the engine's Trainer (in the
spirit of Torch-Pruning's pruner + scheduler): ``Schedule`` says how many pruning steps there are
and each step's conv/FC targets; ``prune_step`` is lines 3-10 for one step (regroup each layer on
its masked weights with k-means, or with fixed equal groups for ``grouping="fixed"``, prune its
centroids to the target); ``StepRecord.measure`` is what a step achieved (Eq. 14)."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import NumericalError
from .grouping import centroid_prune, importance_vectors, make_grouping
from .layers import SGConv2d, SGLinear

log = logging.getLogger("sgdet")


@dataclass(frozen=True)
class Schedule:
    """Step t = 1..steps prunes conv layers to min(t*step, conv_ratio) and FC layers to
    min(t*step, fc_ratio) of their connections; ``step=None`` (or a step past both ratios) prunes
    in one shot."""
    conv_ratio: float
    fc_ratio: float
    step: float | None = 0.1

    @property
    def goal(self) -> float:
        return max(float(self.conv_ratio), float(self.fc_ratio))

    @property
    def effective_step(self) -> float:
        goal = self.goal
        return goal if self.step is None or float(self.step) >= goal else float(self.step)

    @property
    def steps(self) -> int:
        goal, step = self.goal, self.effective_step
        return max(1, math.ceil(goal / step - 1e-9)) if goal > 0 else 1

    def targets(self, t: int) -> tuple[float, float]:
        """(conv target, FC target) of step ``t`` (1-based)."""
        reached = round(t * self.effective_step, 10)
        return min(reached, float(self.conv_ratio)), min(reached, float(self.fc_ratio))

    def __iter__(self) -> Iterator[tuple[int, float, float]]:
        for t in range(1, self.steps + 1):
            yield (t, *self.targets(t))

    def __len__(self) -> int:
        return self.steps


def connection_fraction(layers: Iterable[nn.Module]) -> float:
    """Pruned fraction of all connections of ``layers`` together (Eq. 14)."""
    layers = list(layers)
    total = sum(m.mask.numel() for m in layers)
    if total == 0:
        return 0.0
    return 1.0 - sum(int(m.mask.sum()) for m in layers) / total


@dataclass
class StepRecord:
    """What one pruning step of Algorithm 1 achieved."""
    step: int
    conv_target: float
    fc_target: float
    conv_pruned: float        # pruned fraction of all SG conv connections (Eq. 14 over convs)
    fc_pruned: float          # the same over SG linear layers
    network_pruned: float     # Eq. 14 over every SG layer
    layers: dict = field(default_factory=dict)   # name -> {"groups", "pruned"}

    @classmethod
    def measure(cls, t: int, conv_target: float, fc_target: float, layers: dict[str, nn.Module],
                summary: dict) -> "StepRecord":
        return cls(step=t, conv_target=conv_target, fc_target=fc_target,
                   conv_pruned=connection_fraction(m for m in layers.values() if isinstance(m, SGConv2d)),
                   fc_pruned=connection_fraction(m for m in layers.values() if isinstance(m, SGLinear)),
                   network_pruned=connection_fraction(layers.values()), layers=summary)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def prune_step(layers: dict[str, nn.Module], conv_target: float, fc_target: float, groups: int,
               seed: int = 0, n_init: int = 1, warned: set[str] | None = None,
               grouping: str = "kmeans") -> dict:
    """One pass of lines 3-10 of Algorithm 1 over ``layers``: regroup each layer on its current
    masked weights and prune it to its target fraction. Returns per-layer summaries.
    ``warned`` collects layers already reported as narrower than ``groups`` (say it once).
    ``grouping``: ``"kmeans"`` (self-grouping) or ``"fixed"`` (equal groups by filter index, the
    same at every step: CondenseNet's split, pruned by the same centroid rule)."""
    warned = set() if warned is None else warned
    summary = {}
    for name, layer in layers.items():
        if not torch.isfinite(layer.weight).all():
            raise NumericalError(f"layer {name!r} has NaN or inf weights; cannot group it")
        c_out = layer.mask.shape[0]
        if c_out < groups and name not in warned:
            warned.add(name)
            log.warning("sgdet: layer %s has %d filters < groups=%d; using %d groups",
                        name, c_out, groups, c_out)
        found = make_grouping(importance_vectors(layer.weight, layer.mask), groups, grouping, seed, n_init)
        target = conv_target if isinstance(layer, SGConv2d) else fc_target
        keep = centroid_prune(found.centroids, found.sizes, target)
        layer.set_structure(found.labels, keep)
        summary[name] = {"groups": int(found.centroids.shape[0]), "pruned": layer.pruned_fraction()}
    return summary
