"""Benchmark: wall time of one-shot self-grouping compression (importance vectors, k-means and
centroid pruning of every layer) of ResNet50 and DenseNet201 on this machine's CPU.

Targets (issue 2): ResNet50 under 15 s, DenseNet201 under 45 s on 2 cores. Writes
benchmarks/results/compress_cost.json and .md; run with `make bench` or directly."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import sgdet
from sgdet.files import write_json, write_text

TARGETS = {"resnet50": 15.0, "densenet201": 45.0}


def measure(arch: str, conv_ratio: float, fc_ratio: float, groups: int, repeats: int) -> dict:
    times = []
    for seed in range(repeats):
        torch.manual_seed(seed)
        model = sgdet.build(arch).eval()
        start = time.perf_counter()
        sgdet.compress(model, conv_ratio=conv_ratio, fc_ratio=fc_ratio, groups=groups, step=None, seed=seed)
        times.append(time.perf_counter() - start)
    counts = sgdet.count(model, (3, 224, 224))
    return {"arch": arch, "conv_ratio": conv_ratio, "fc_ratio": fc_ratio, "groups": groups,
            "layers": len(sgdet.sg_layers(model)), "seconds": times,
            "median_s": statistics.median(times), "target_s": TARGETS.get(arch),
            "params": counts["params"], "flops": counts["flops"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(TARGETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compress_cost"))
    args = parser.parse_args()
    rows = [measure(arch, 0.6, 0.6, 16, args.repeats) for arch in args.archs]
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "processor": platform.processor(),
               "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}
    lines = ["| Model | SG layers | one-shot compress, median of "
             f"{args.repeats} (s) | runs (s) | target (s) | within target |", "|---|---|---|---|---|---|"]
    for r in rows:
        ok = "yes" if r["target_s"] is None or r["median_s"] <= r["target_s"] else "NO"
        runs = ", ".join(f"{t:.2f}" for t in r["seconds"])
        lines.append(f"| {r['arch']} Conv-60/FC-60 g=16 | {r['layers']} | {r['median_s']:.2f} | {runs} | "
                     f"{r['target_s']} | {ok} |")
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out + ".json", {"machine": machine, "results": rows}, indent=2)
    write_text(args.out + ".md", f"# One-shot compression cost\n\nMachine: {machine['cpu_count']} cores, "
               f"torch {machine['torch']} ({machine['torch_threads']} threads), {machine['when']}.\n\n"
               f"{table}\n")
    print(table)


if __name__ == "__main__":
    main()
