"""Compression, the library's entry to Algorithm 1: choose the compressible layers, swap in masked
SG layers, then run the one schedule (``sgdet.schedule``: importance -> k-means (or fixed equal
groups, ``grouping="fixed"``) -> centroid pruning with step s until the conv and FC targets are
reached), calling an optional local fine-tuning hook after each step."""
from __future__ import annotations

import fnmatch
import logging
import math
import numbers
import sys
import time
from typing import Callable, Iterable, Sequence

from torch import nn

from .errors import ConfigError
from .grouping import GROUPINGS
from .layers import SGConv2d, SGLinear, is_sg_layer
from .schedule import Schedule, StepRecord, prune_step

log = logging.getLogger("sgdet")

#: Layers left dense unless an ``include`` pattern names them (the paper's ResNet accounting).
DEFAULT_EXCLUDE: tuple[str, ...] = ("*downsample*",)

FinetuneHook = Callable[[nn.Module, int], None]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


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
            model.set_submodule(name, module)
        layers[name] = module
    return layers


def sg_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_sg_layer(m)}


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_arguments(conv_ratio: float, fc_ratio: float, groups: int, step: float | None,
              seed: int = 0, n_init: int = 1, grouping: str = "kmeans") -> None:
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
    if grouping not in GROUPINGS:
        raise ConfigError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")


def compress(model: nn.Module, conv_ratio: float, fc_ratio: float, groups: int = 16,
             step: float | None = 0.1, seed: int = 0, finetune: FinetuneHook | None = None,
             include: Sequence[str] = (), exclude: Sequence[str] | None = None,
             n_init: int = 1, progress: bool | str | None = False,
             grouping: str = "kmeans") -> list[StepRecord]:
    """Compress ``model`` in place with self-grouping (Algorithm 1).

    Each step t prunes every conv layer to min(t*step, conv_ratio) and every FC layer to
    min(t*step, fc_ratio) of its connections, then calls ``finetune(model, t)`` (local
    fine-tuning) if given. ``step=None`` prunes in one shot. ``grouping="fixed"`` replaces k-means
    by CondenseNet's fixed equal groups (the ablation). ``progress``: True a tqdm bar, ``"log"``
    a log line per step with its time and ETA (the ``sgdet`` logger, INFO), None a bar where stdout
    and stderr are terminals and log lines otherwise (``| tee``, a log file), False nothing.
    Returns one StepRecord per step."""
    validate_arguments(conv_ratio, fc_ratio, groups, step, seed, n_init, grouping)
    groups, seed, n_init = int(groups), int(seed), int(n_init)
    conv_ratio, fc_ratio = float(conv_ratio), float(fc_ratio)
    step = None if step is None else float(step)
    layers = convert(model, include, exclude)
    if not layers:
        raise ConfigError("the model has no compressible Conv2d/Linear layers")
    schedule = Schedule(conv_ratio, fc_ratio, step)
    steps = iter(schedule)
    terminal = sys.stdout.isatty() and sys.stderr.isatty()
    log_steps = progress == "log" or (progress is None and not terminal)
    if progress is True or (progress is None and terminal):
        from tqdm.auto import tqdm
        steps = tqdm(steps, total=len(schedule), desc="self-grouping", unit="step")
    records, warned, started = [], set(), time.time()
    for t, conv_target, fc_target in steps:
        summary = prune_step(layers, conv_target, fc_target, groups, seed, n_init, warned, grouping)
        if finetune is not None:
            finetune(model, t)
            for layer in layers.values():   # an optimiser must not revive pruned weights
                layer.zero_pruned_()
        records.append(StepRecord.measure(t, conv_target, fc_target, layers, summary))
        if log_steps:
            seconds = time.time() - started
            eta = seconds / t * (len(schedule) - t)
            log.info("self-grouping step %d/%d: conv %.0f%%, FC %.0f%% pruned  (%.1f s/step, eta %s)",
                     t, len(schedule), 100 * conv_target, 100 * fc_target, seconds / t,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
    return records
