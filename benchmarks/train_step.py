"""Benchmark: time of one SGD training step (forward, backward, optimiser step) of a masked SG
model against the same dense model, on this machine's CPU, measured interleaved in one run and
reported as a ratio. Target (classification issue): masked <= 1.15x dense for ResNet50.

Writes benchmarks/results/train_step.json and .md."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import sgdet
from sgdet.files import write_text


def step_time(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step"))
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = sgdet.build(args.arch).train()
    masked = sgdet.build(args.arch).train()
    masked.load_state_dict(dense.state_dict())
    sgdet.compress(masked, conv_ratio=0.6, fc_ratio=0.6, groups=16, step=None)
    models = {"dense": dense, "masked": masked}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    times = {k: [] for k in models}
    for i in range(args.warmup + args.repeats):
        for name in (("dense", "masked") if i % 2 == 0 else ("masked", "dense")):   # interleaved
            t = step_time(models[name], images, labels, optimizers[name])
            if i >= args.warmup:
                times[name].append(t)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["masked"] / median["dense"]
    result = {"arch": args.arch, "batch": args.batch, "size": args.size, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "median_s": median, "ratio_masked_over_dense": ratio,
              "target": 1.15, "when": time.strftime("%Y-%m-%d %H:%M"), "times_s": times}
    table = ("| Model | batch | dense step (s) | masked step (s) | masked / dense | target |\n"
             "|---|---|---|---|---|---|\n"
             f"| {args.arch} Conv-60/FC-60 g=16 | {args.batch}x{args.size}px | {median['dense']:.3f} | "
             f"{median['masked']:.3f} | {ratio:.3f} | <= 1.15 |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2)),
                         (".md", f"# Training step, masked vs dense (CPU, {torch.get_num_threads()} threads, "
                                 f"median of {args.repeats}, interleaved, {result['when']})\n\n{table}\n")):
        write_text(args.out + suffix, text)
    print(table)


if __name__ == "__main__":
    main()
