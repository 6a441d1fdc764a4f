"""Deployment, fast stage, measurement: the interleaved timing every speed decision rests on
(plan choice per layer, BN un-gathering, the whole-model check) and the benchmarks use, and the
confirmation that keeps a close call from replacing a dense layer on timing noise.
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


def confirmed_win(fast, dense, first: dict[str, float], margin: float, repeats: int = 5,
                  device: torch.device | None = None) -> tuple[bool, dict[str, float]]:
    """Whether callable ``fast`` beats ``dense`` by ``margin``, given a first timing ``first``
    {"fast": s, "dense": s}. A clear first verdict stands; a close one (a win by less than 3x the
    margin) is timed again, the two alone, over 3x the rounds, and that second verdict decides.
    On a shared 2-core VM 3-5 rounds put layers on plans that later measured 8-28 % slower than
    dense: noise of that size only passes the first test by a few percent. Returns the verdict
    and the confirmation's medians ({} when none ran)."""
    if first["fast"] >= (1.0 - margin) * first["dense"]:
        return False, {}
    if first["fast"] < (1.0 - 3.0 * margin) * first["dense"]:
        return True, {}
    again = time_interleaved({"fast": fast, "dense": dense}, repeats=max(3 * repeats, 9),
                             warmup=1, device=device)
    return again["fast"] < (1.0 - margin) * again["dense"], again
