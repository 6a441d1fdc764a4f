"""Benchmark, deployment stage (the "why" behind deploy_speed): for ResNet50's conv shapes at
224 px, how long the diverse-group form's gather takes next to the dense conv it replaces.

Each group of a Conv-60 layer reads its own ~40 % of the input channels; with g = 16 groups the
gathered input holds ~6.4x the layer's input channels. Timed, interleaved, per shape (batch 8,
channels_last by default): the dense conv, the gather alone (one index_select building every
group's input), the per-group convs alone (on an already gathered input), and the two together.
Group input sets are random (what one-shot compression of random weights gives); group sizes are
equal. Writes <out>.json and <out>.md (default benchmarks/results/gather_cost)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from deploy_speed import machine_info          # noqa: E402
from sgdet.files import write_text               # noqa: E402

from sgdet.deploy.modules import select_channels             # noqa: E402
from sgdet.deploy.timing import time_interleaved             # noqa: E402

# (name, in channels, out channels, kernel, spatial size): one of each conv kind per stage
SHAPES = [("layer1 conv1", 256, 64, 1, 56), ("layer1 conv2", 64, 64, 3, 56), ("layer1 conv3", 64, 256, 1, 56),
          ("layer2 conv2", 128, 128, 3, 28), ("layer3 conv1", 1024, 256, 1, 14),
          ("layer3 conv2", 256, 256, 3, 14), ("layer3 conv3", 256, 1024, 1, 14),
          ("layer4 conv1", 2048, 512, 1, 7), ("layer4 conv2", 512, 512, 3, 7), ("layer4 conv3", 512, 2048, 1, 7)]


def measure(c_in, c_out, k, size, batch, groups, keep, fmt, repeats) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=generator).contiguous(memory_format=fmt)
    weight = torch.randn(c_out, c_in, k, k, generator=generator).contiguous(memory_format=fmt)
    per_group_in = max(1, round(keep * c_in))
    index = torch.cat([torch.randperm(c_in, generator=generator)[:per_group_in].sort().values
                       for _ in range(groups)])
    group_weight = torch.randn(c_out, per_group_in, k, k, generator=generator).contiguous(memory_format=fmt)
    gathered = select_channels(x, 1, index)
    pad = k // 2
    t = time_interleaved({
        "dense": lambda: F.conv2d(x, weight, padding=pad),
        "gather": lambda: select_channels(x, 1, index),
        "convs": lambda: F.conv2d(gathered, group_weight, padding=pad, groups=groups),
        "both": lambda: F.conv2d(select_channels(x, 1, index), group_weight, padding=pad, groups=groups),
    }, repeats=repeats, warmup=2)
    return {"dense_ms": 1e3 * t["dense"], "gather_ms": 1e3 * t["gather"], "convs_ms": 1e3 * t["convs"],
            "both_ms": 1e3 * t["both"], "gathered_channels": int(index.numel()),
            "flop_ratio": c_in / per_group_in}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.4, help="fraction of inputs each group reads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gather_cost"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    rows = []
    for name, c_in, c_out, k, size in SHAPES:
        rows.append({"layer": name, "c_in": c_in, "c_out": c_out, "kernel": k, "size": size,
                     **measure(c_in, c_out, k, size, args.batch, args.groups, args.keep, fmt, args.repeats)})
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if k.endswith("_ms")),
              file=sys.stderr, flush=True)
    payload = {"machine": machine_info(args.threads), "batch": args.batch, "groups": args.groups,
               "keep": args.keep, "memory_format": args.memory_format, "repeats": args.repeats, "rows": rows}
    m = payload["machine"]
    lines = ["# Cost of the diverse-group gather next to the dense conv", "",
             f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), {m['when']}. Batch {args.batch}, {args.memory_format}, "
             f"g = {args.groups} groups each reading a random {round(100 * args.keep)} % of the inputs "
             f"(equal sizes); median of {args.repeats} interleaved runs. Times are relative to the dense conv.", "",
             "| ResNet50 conv | in -> out, kernel, px | dense ms | gathered channels | gather alone | "
             "group convs alone | gather + convs | FLOP ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["dense_ms"]
        lines.append(f"| {r['layer']} | {r['c_in']} -> {r['c_out']}, {r['kernel']}x{r['kernel']}, {r['size']} | "
                     f"{d:.2f} | {r['gathered_channels']} | {r['gather_ms'] / d:.2f}x | {r['convs_ms'] / d:.2f}x | "
                     f"{r['both_ms'] / d:.2f}x | {r['flop_ratio']:.2f}x fewer |")
    text = "\n".join(lines) + "\n"
    write_text(args.out + ".json", json.dumps(payload, indent=1))
    write_text(args.out + ".md", text)
    print(text)


if __name__ == "__main__":
    main()
