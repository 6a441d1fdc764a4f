"""Benchmark, deployment stage, native kernels (issue 14): whole-network latency of a compressed
model deployed with sgdet.deploy(optimize=True, backend=...) against the FASTEST dense PyTorch
baseline a serious user would pick: eager NCHW, eager channels_last and TorchScript frozen +
optimize_for_inference (conv-BN folding, oneDNN); onnxruntime's dense time is reported beside it.

Every variant of one setting is timed in the same run, interleaved round by round in a seeded
shuffled order; median and min of the rounds are recorded, speed-ups are medians over the best
dense median. Weights are random (seeded) and compression one-shot, except for ``--trained``
checkpoints (masks learned on data). The per-layer table times each deployed conv in its chosen
form against the dense layer on the layer's real input: FLOP ratio, achieved GFLOP/s and the
efficiency per MAC against oneDNN's dense layer.
Writes <out>.json and <out>.md (default benchmarks/results/native_speed)."""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import torch

import sgdet
from sgdet.deploy import native
from sgdet.deploy.modules import DiverseGroupConv2d
from sgdet.deploy.optimize import capture_inputs
from sgdet.deploy.plans import plan_label
from sgdet.deploy.timing import time_samples
from sgdet.files import write_text

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deploy_speed import machine_info          # noqa: E402


def dense_baselines(dense: torch.nn.Module, x: torch.Tensor) -> dict:
    """{name: (callable, input)} of the dense model in the forms a user would try."""
    eager = dense.eval()
    cl = copy.deepcopy(dense).to(memory_format=torch.channels_last).eval()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(dense).eval(), x)))
    return {"dense_nchw": (eager, x), "dense_cl": (cl, x_cl), "dense_jit": (frozen, x)}


def onnx_dense_ms(dense, x, repeats, threads) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import tempfile
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(folder, "dense.onnx")
        torch.onnx.export(dense, (x,), path, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        samples = time_samples({"ort": lambda: session.run(None, feed)}, repeats, 2)["ort"]
    return 1e3 * statistics.median(samples)


def per_layer(dense: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[dict]:
    """Each deployed conv in its chosen form against the dense conv on the same input."""
    inputs = capture_inputs(fast, x, (DiverseGroupConv2d,))
    rows = []
    with torch.no_grad():
        for name, layer in fast.named_modules():
            if not isinstance(layer, DiverseGroupConv2d) or name not in inputs:
                continue
            xin = inputs[name]
            ref = dense.get_submodule(name)
            full = xin if xin.shape[1] == ref.in_channels else None
            if full is None:          # a shrunk input (dead channels): time dense on a full-width one
                full = torch.randn(xin.shape[0], ref.in_channels, *xin.shape[2:])
            s = time_samples({"sg": lambda: layer(xin), "dense": lambda: ref(full)}, repeats, 2)
            t_sg, t_dense = statistics.median(s["sg"]), statistics.median(s["dense"])
            y = layer(xin)
            macs_sg = y.shape[0] * y[0, 0].numel() * sum(w.numel() for w in layer.weights)
            macs_dense = y.shape[0] * y[0, 0].numel() * ref.weight.numel()
            rows.append({"layer": name, "plan": plan_label(layer.plan),
                         "kernel": list(layer.kernel_size), "stride": list(layer.stride),
                         "flop_ratio": macs_dense / max(macs_sg, 1), "sg_ms": 1e3 * t_sg,
                         "dense_ms": 1e3 * t_dense, "speedup": t_dense / t_sg,
                         "gflops": 2 * macs_sg / t_sg / 1e9, "dense_gflops": 2 * macs_dense / t_dense / 1e9,
                         "efficiency": (macs_sg / t_sg) / (macs_dense / t_dense)})
    return rows


def run_setting(name: str, dense, masked, batch: int, size: int, backend: str, repeats: int,
                calib_repeats: int, threads: int, layers: bool, log) -> dict:
    x = torch.randn(batch, masked_channels(dense), size, size)
    start = time.perf_counter()
    fast = sgdet.deploy(masked, optimize=True, example_input=x, repeats=calib_repeats, backend=backend).eval()
    calibration_s = time.perf_counter() - start
    report = fast.sgdet_fast_report
    plans: dict = {}
    for entry in report["layers"].values():
        label = entry["plan"].split("-")[0]
        plans[label] = plans.get(label, 0) + 1
    variants = dense_baselines(copy.deepcopy(dense), x)
    variants["sg"] = (fast, x)
    with torch.no_grad():
        diff = float((fast(x) - masked.eval()(x)).abs().max())
        samples = time_samples({k: (lambda m=m, xi=xi: m(xi)) for k, (m, xi) in variants.items()}, repeats, 3)
    med = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    best = min((k for k in med if k != "sg"), key=med.get)
    row = {"setting": name, "batch": batch, "backend": backend, "isa": native.isa() if native.available() else None,
           "median_ms": med, "min_ms": {k: 1e3 * min(v) for k, v in samples.items()},
           "best_dense": best, "speedup": med[best] / med["sg"],
           "speedup_min": min(samples[best]) / min(samples["sg"]),
           "plans": plans, "folded_norms": report.get("folded_norms", 0),
           "native_dense_convs": report.get("native_dense_convs", []),
           "folded_dense_convs": report.get("folded_dense_convs", []),
           "channels_last_pools": report.get("channels_last_pools", []),
           "verified": report.get("verified"), "calibration_s": calibration_s, "max_abs_diff": diff,
           "flops_dense": sgdet.count_flops(dense, (x.shape[1], size, size)),
           "flops_sg": sgdet.count_flops(masked, (x.shape[1], size, size))}
    row["flop_ratio"] = row["flops_dense"] / row["flops_sg"]
    if x.shape[1] == 3:
        row["onnxruntime_dense_ms"] = onnx_dense_ms(dense, x, repeats, threads)
    if layers:
        row["layers"] = per_layer(dense, fast, x, max(5, repeats // 2))
        row["worst_layer"] = min(row["layers"], key=lambda r: r["speedup"]) if row["layers"] else None
    log(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
        + f" -> {row['speedup']:.2f}x over {best} (FLOP ratio {row['flop_ratio']:.2f}x; plans {plans})")
    return row


def masked_channels(model) -> int:
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, sgdet.SGConv2d)))
    return first.in_channels


def markdown(payload: dict) -> str:
    m = payload["machine"]
    isa = next((r["isa"] for r in payload["rows"] if r.get("isa")), "none")
    lines = [f"# Native kernels: whole-network latency ({m.get('cpu_model', '')}, kernel ISA {isa}, "
             f"{m['torch_threads']} threads, torch {m['torch']}, {m['when']})", "",
             f"Command: `{payload['command']}`", "",
             "| setting | batch | FLOP ratio | best dense | dense ms (nchw / cl / jit) | onnxruntime ms | SG ms | "
             "speed-up (median) | (min) | plans |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        d = r["median_ms"]
        ort = r.get("onnxruntime_dense_ms")
        lines.append(f"| {r['setting']} | {r['batch']} | {r['flop_ratio']:.2f}x | {r['best_dense']} | "
                     f"{d['dense_nchw']:.1f} / {d['dense_cl']:.1f} / {d['dense_jit']:.1f} | "
                     f"{'-' if ort is None else f'{ort:.1f}'} | {d['sg']:.1f} | **{r['speedup']:.2f}x** | "
                     f"{r['speedup_min']:.2f}x | {r['plans']} |")
    for r in payload["rows"]:
        if not r.get("layers"):
            continue
        lines += ["", f"## Per layer: {r['setting']}, batch {r['batch']}", "",
                  "| layer | k/s | plan | FLOP ratio | SG ms | dense ms | speed-up | GFLOP/s | dense GFLOP/s | efficiency |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["layers"]:
            lines.append(f"| {x['layer']} | {x['kernel'][0]}/{x['stride'][0]} | {x['plan']} | {x['flop_ratio']:.2f}x | "
                         f"{x['sg_ms']:.2f} | {x['dense_ms']:.2f} | {x['speedup']:.2f}x | {x['gflops']:.0f} | "
                         f"{x['dense_gflops']:.0f} | {100 * x['efficiency']:.0f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="*", default=["resnet50", "densenet201"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.6, 0.7, 0.8])
    parser.add_argument("--fc-ratio", type=float, default=0.6)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--size", type=int, default=224, help="input size for --archs models")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calib-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer tables")
    parser.add_argument("--trained", nargs="*", default=[],
                        help="sgdet checkpoints of trained masked models (e.g. the demo's LeNet-5)")
    parser.add_argument("--trained-size", type=int, default=28, help="input size for --trained models")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "native_speed"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.backend != "torch" and not native.available():
        sys.exit(f"native_speed: error: {native.unavailable_reason()}")
    log = lambda msg: print(msg, flush=True)                  # noqa: E731
    payload = {"command": "python benchmarks/native_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": {**machine_info(args.threads), "isas": native.isas() if native.available() else []},
               "rows": []}

    def save():
        write_text(args.out + ".json", json.dumps(payload, indent=1))
        write_text(args.out + ".md", markdown(payload))

    for arch in args.archs:
        for ratio in args.ratios:
            torch.manual_seed(0)
            dense = sgdet.build(arch).eval()
            masked = copy.deepcopy(dense)
            sgdet.compress(masked, conv_ratio=ratio, fc_ratio=args.fc_ratio, groups=args.groups, step=None, seed=0)
            for b in args.batches:
                name = f"{arch} Conv-{round(100 * ratio)}/FC-{round(100 * args.fc_ratio)} g={args.groups}"
                payload["rows"].append(run_setting(name, dense, masked.eval(), b, args.size, args.backend, args.repeats,
                                                   args.calib_repeats, args.threads, not args.no_layers, log))
                save()
    for path in args.trained:
        masked = sgdet.load(path).eval()
        dense = copy.deepcopy(masked)
        for n, m in list(dense.named_modules()):       # the same network with its dense layers back
            if isinstance(m, sgdet.SGConv2d):
                conv = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                       m.dilation, bias=m.bias is not None)
                conv.load_state_dict({k: v for k, v in m.state_dict().items() if k in ("weight", "bias")})
                dense.set_submodule(n, conv)
            elif isinstance(m, sgdet.SGLinear):
                lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                lin.load_state_dict({k: v for k, v in m.state_dict().items() if k in ("weight", "bias")})
                dense.set_submodule(n, lin)
        for b in args.batches:
            label = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
            payload["rows"].append(run_setting(f"trained {label}", dense.eval(), masked, b,
                                               args.trained_size, args.backend, args.repeats, args.calib_repeats,
                                               args.threads, not args.no_layers, log))
            save()
    save()
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
