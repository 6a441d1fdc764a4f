"""Benchmark, deployment stage, native kernels alone (issue 14): where a layer's time goes. For
ResNet50 conv shapes compressed with g equal groups each reading a fraction of the channels,
the native conv is timed in every tile variant of the ISA in use on (a) random channel lists,
as compression leaves them, and (b) contiguous ones (channels 0..k-1, the same FLOPs with no
index scatter), interleaved with oneDNN's dense conv of the same shape. GFLOP/s count the
layer's own FLOPs (the dense conv its dense ones), so (b) over (a) is what the index lists cost
and (b) against dense is the micro-kernel's own efficiency.
Writes <out>.json and <out>.md (default benchmarks/results/native_kernel_shapes_<isa>)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from sgdet.deploy import native
from sgdet.deploy.timing import time_interleaved
from sgdet.files import write_text

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deploy_speed import machine_info          # noqa: E402

# (name, c_in, c_out, kernel, map size) of ResNet50's stride-1 convs at 224 px
SHAPES = [("layer1 conv3 1x1", 64, 256, 1, 56), ("layer2 conv1 1x1", 512, 128, 1, 28),
          ("layer2 conv2 3x3", 128, 128, 3, 28), ("layer3 conv1 1x1", 1024, 256, 1, 14),
          ("layer3 conv2 3x3", 256, 256, 3, 14), ("layer3 conv3 1x1", 256, 1024, 1, 14)]


def run_shape(name, cin, cout, k, size, batch, groups, keep, repeats) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size)
    kg, per = round(keep * cin), cout // groups
    weights = [torch.randn(per, kg, k, k) for _ in range(groups)]
    packs = {"random": native.pack_conv(weights, [torch.randperm(cin)[:kg] for _ in range(groups)],
                                        torch.arange(cout)),
             "contiguous": native.pack_conv(weights, [torch.arange(kg)] * groups, torch.arange(cout))}
    dense_w = torch.randn(cout, cin, k, k)
    fns = {"dense": lambda: F.conv2d(x, dense_w, padding=k // 2)}
    for v in range(len(native.variants())):
        for lists, packed in packs.items():
            fns[f"{lists}-{v}"] = (lambda p=packed, v=v: native.conv2d(x, p, padding=(k // 2, k // 2), variant=v))
    with torch.no_grad():
        med = time_interleaved(fns, repeats=repeats, warmup=2, device=x.device)
    flops_sg = 2 * batch * size * size * cout * kg * k * k
    flops_dense = 2 * batch * size * size * cout * cin * k * k
    return {"shape": name, "c_in": cin, "c_out": cout, "kernel": k, "size": size, "batch": batch,
            "groups": groups, "keep": keep, "median_ms": {key: 1e3 * s for key, s in med.items()},
            "dense_gflops": flops_dense / med["dense"] / 1e9,
            "gflops": {key: flops_sg / s / 1e9 for key, s in med.items() if key != "dense"}}


def markdown(payload: dict) -> str:
    m, rows = payload["machine"], payload["rows"]
    variants = payload["variants"]
    head = " | ".join(f"v{v} {tf}x{pv} random / contiguous" for v, (tf, pv, _) in enumerate(variants))
    lines = [f"# Native kernel alone, by conv shape ({m.get('cpu_model', '')}, kernel ISA {payload['isa']}, "
             f"{m['torch_threads']} threads, torch {m['torch']}, {m['when']})", "",
             f"Command: `{payload['command']}`", "",
             "GFLOP/s of the layer's own FLOPs (median of interleaved rounds); tile variants are filters x "
             "pixel vectors.", "",
             f"| shape | batch | groups, kept | dense GFLOP/s | {head} |",
             "|---|---|---|---|" + "---|" * len(variants)]
    for r in rows:
        cells = " | ".join(f"{r['gflops'][f'random-{v}']:.0f} / {r['gflops'][f'contiguous-{v}']:.0f}"
                           for v in range(len(variants)))
        lines.append(f"| {r['shape']} {r['c_in']}->{r['c_out']} @{r['size']} | {r['batch']} | "
                     f"{r['groups']}, {100 * r['keep']:.0f} % | {r['dense_gflops']:.0f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--keep", nargs="+", type=float, default=[0.4, 0.2],
                        help="fraction of input channels each group reads (Conv-60: 0.4, Conv-80: 0.2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not native.available():
        sys.exit(f"native_kernel_shapes: error: {native.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"native_kernel_shapes_{native.isa()}")
    payload = {"command": "python benchmarks/native_kernel_shapes.py " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "machine": machine_info(args.threads), "isa": native.isa(),
               "variants": [list(v) for v in native.variants()], "rows": []}
    for keep in args.keep:
        for shape in SHAPES[:args.shapes]:
            row = run_shape(*shape, args.batch, args.groups, keep, args.repeats)
            payload["rows"].append(row)
            best = max(row["gflops"], key=row["gflops"].get)
            print(f"{row['shape']} keep {keep}: dense {row['dense_gflops']:.0f} GFLOP/s, best {best} "
                  f"{row['gflops'][best]:.0f}", flush=True)
            write_text(out + ".json", json.dumps(payload, indent=1))
            write_text(out + ".md", markdown(payload))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
