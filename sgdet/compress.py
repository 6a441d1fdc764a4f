"""The self-grouping schedule (Algorithm 1): choose the compressible layers, swap in masked SG
layers, then repeat importance -> k-means -> centroid pruning with step s until the conv and FC
targets are reached, calling an optional local fine-tuning hook after each step."""
from __future__ import annotations

import fnmatch
import logging
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import ConfigError, NumericalError
from .grouping import centroid_prune, group_filters, importance_vectors
from .layers import SGConv2d, SGLinear, is_sg_layer

log = logging.getLogger("sgdet")

#: Layers left dense unless an ``include`` pattern names them (the paper's ResNet accounting).
DEFAULT_EXCLUDE: tuple[str, ...] = ("*downsample*",)

FinetuneHook = Callable[[nn.Module, int], None]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def compressible_layers(model: nn.Module, include: Sequence[str] = (),
                        exclude: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Names and modules of the layers self-grouping applies to: every Conv2d with groups == 1 and
    every Linear, except the network's first convolution and ``exclude`` patterns (default:
    ResNet ``downsample`` convs). ``include`` patterns (fnmatch on module names) win over both."""
    exclude = DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
    chosen, first_conv_seen, skipped_grouped = [], False, []
    for name, module in model.named_modules():
        is_conv = isinstance(module, nn.Conv2d)
        if not (is_conv or isinstance(module, nn.Linear)):
            continue
        first_conv = is_conv and not first_conv_seen
        first_conv_seen = first_conv_seen or is_conv
        forced = _matches(name, include)
        if is_conv and module.groups != 1:
            skipped_grouped.append(name)
            continue
        if not forced and (first_conv or _matches(name, exclude)):
            continue
        if is_conv and module.padding_mode != "zeros":
            log.info("sgdet: leaving %s dense (padding_mode=%s)", name, module.padding_mode)
            continue
        chosen.append((name, module))
    if skipped_grouped:
        log.info("sgdet: leaving %d grouped/depthwise conv(s) dense: %s", len(skipped_grouped),
                 ", ".join(skipped_grouped[:5]) + (" ..." if len(skipped_grouped) > 5 else ""))
    return chosen


def convert(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] | None = None
            ) -> dict[str, nn.Module]:
    """Swap every compressible layer for its masked SG twin (in place; weights copied, nothing
    pruned yet). Already-converted layers are kept. Returns {name: SG layer}."""
    layers = {}
    for name, module in compressible_layers(model, include, exclude):
        if not is_sg_layer(module):
            module = (SGConv2d if isinstance(module, nn.Conv2d) else SGLinear).from_dense(module)
            _replace_module(model, name, module)
        layers[name] = module
    return layers


def sg_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_sg_layer(m)}


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

    def to_dict(self) -> dict:
        return asdict(self)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_arguments(conv_ratio: float, fc_ratio: float, groups: int, step: float | None,
              seed: int = 0, n_init: int = 1) -> None:
    """Reject bad arguments up front with a ConfigError naming the argument."""
    for label, value in (("conv_ratio", conv_ratio), ("fc_ratio", fc_ratio)):
        if not _is_real(value) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{label} must be in [0, 1), got {value!r}")
    if not _is_int(groups) or groups < 1:
        raise ConfigError(f"groups must be an integer >= 1, got {groups!r}")
    if step is not None and (not _is_real(step) or not 0.0 < step <= 1.0):
        raise ConfigError(f"step must be in (0, 1], got {step!r}")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not _is_int(n_init) or n_init < 1:
        raise ConfigError(f"n_init must be an integer >= 1, got {n_init!r}")


def _connection_fraction(layers: Iterable[nn.Module]) -> float:
    layers = list(layers)
    total = sum(m.mask.numel() for m in layers)
    if total == 0:
        return 0.0
    return 1.0 - sum(int(m.mask.sum()) for m in layers) / total


@torch.no_grad()
def prune_step(layers: dict[str, nn.Module], conv_target: float, fc_target: float, groups: int,
               seed: int = 0, n_init: int = 1, warned: set[str] | None = None) -> dict:
    """One pass of lines 3-10 of Algorithm 1 over ``layers``: regroup each layer on its current
    masked weights and prune it to its target fraction. Returns per-layer summaries.
    ``warned`` collects layers already reported as narrower than ``groups`` (say it once)."""
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
        grouping = group_filters(importance_vectors(layer.weight, layer.mask), groups, seed, n_init)
        target = conv_target if isinstance(layer, SGConv2d) else fc_target
        keep = centroid_prune(grouping.centroids, grouping.sizes, target)
        layer.set_structure(grouping.labels, keep)
        summary[name] = {"groups": int(grouping.centroids.shape[0]), "pruned": layer.pruned_fraction()}
    return summary


def compress(model: nn.Module, conv_ratio: float, fc_ratio: float, groups: int = 16,
             step: float | None = 0.1, seed: int = 0, finetune: FinetuneHook | None = None,
             include: Sequence[str] = (), exclude: Sequence[str] | None = None,
             n_init: int = 1, progress: bool = False) -> list[StepRecord]:
    """Compress ``model`` in place with self-grouping (Algorithm 1).

    Each step t prunes every conv layer to min(t*step, conv_ratio) and every FC layer to
    min(t*step, fc_ratio) of its connections, then calls ``finetune(model, t)`` (local
    fine-tuning) if given. ``step=None`` prunes in one shot. Returns one StepRecord per step."""
    validate_arguments(conv_ratio, fc_ratio, groups, step, seed, n_init)
    groups, seed, n_init = int(groups), int(seed), int(n_init)
    conv_ratio, fc_ratio = float(conv_ratio), float(fc_ratio)
    step = None if step is None else float(step)
    layers = convert(model, include, exclude)
    if not layers:
        raise ConfigError("the model has no compressible Conv2d/Linear layers")
    goal = max(conv_ratio, fc_ratio)
    step = goal if step is None or step >= goal else step
    n_steps = max(1, math.ceil(goal / step - 1e-9)) if goal > 0 else 1
    convs = [m for m in layers.values() if isinstance(m, SGConv2d)]
    fcs = [m for m in layers.values() if isinstance(m, SGLinear)]
    steps = range(1, n_steps + 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="self-grouping", unit="step")
    records, warned = [], set()
    for t in steps:
        conv_target = min(round(t * step, 10), conv_ratio)
        fc_target = min(round(t * step, 10), fc_ratio)
        summary = prune_step(layers, conv_target, fc_target, groups, seed, n_init, warned)
        if finetune is not None:
            finetune(model, t)
            for layer in layers.values():   # an optimiser must not revive pruned weights
                layer.zero_pruned_()
        records.append(StepRecord(step=t, conv_target=conv_target, fc_target=fc_target,
                                  conv_pruned=_connection_fraction(convs),
                                  fc_pruned=_connection_fraction(fcs),
                                  network_pruned=_connection_fraction(layers.values()),
                                  layers=summary))
    return records
