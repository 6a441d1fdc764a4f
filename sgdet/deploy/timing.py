"""Deployment, fast stage, measurement: the interleaved timing every speed decision rests on
(plan choice per layer, BN un-gathering, the whole-model check) and the benchmarks use.
Kept apart from sgdet.deploy.optimize so that plans.py can time candidates without importing it."""
from __future__ import annotations

import random
import statistics
import time

import torch


def time_samples(fns: dict, repeats: int = 5, warmup: int = 2,
                 device: torch.device | None = None) -> dict[str, list[float]]:
    """Wall times in seconds of every call of each callable in ``fns``. Every round calls each
    one once, in a seeded random order, so a slow spell of a shared machine and the after-effects
    of one call on the next hit all of them alike (a CUDA device is synchronised around each call)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict = {name: [] for name in fns}
    names, order = list(fns), random.Random(0)
    for _ in range(repeats):
        # a fresh order each round: a call runs slower after a memory-hungry one (the exact
        # per-group model costs the next call ~25 %), so no callable may always follow another
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
    return samples


def time_interleaved(fns: dict, repeats: int = 5, warmup: int = 2,
                     device: torch.device | None = None) -> dict:
    """Median wall time in seconds of each callable in ``fns`` (see time_samples)."""
    return {name: statistics.median(values)
            for name, values in time_samples(fns, repeats, warmup, device).items()}
