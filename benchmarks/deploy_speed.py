"""Benchmark, deployment stage: latency of the dense baseline, the masked model, the exact deployed
model and the fast deployed model (sgdet.deploy(..., optimize=True), plans timed on the device)
of ResNet50 and DenseNet201 at Conv-60/70/80 / FC-60, g = 16, 224 px, batch 1 and 8; plus
onnxruntime timings of the exported dense, deployed and fast models, and per-layer speed-ups.

All variants of one setting are timed in the same run, interleaved round by round (warm-up, then
the median of the repeats). Weights are random (kaiming init, seeded); compression is one-shot.
Writes <out>.json and <out>.md (default benchmarks/results/deploy_speed). Targets (issue 4, CPU,
batch 8, whole network vs dense): never below 1.0x for a model or a layer; ResNet50 Conv-60/FC-60
>= 1.3x, Conv-80/FC-60 >= 1.6x."""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import sgdet
from sgdet.fast import capture_inputs

TARGETS = {("resnet50", 0.6): 1.3, ("resnet50", 0.8): 1.6}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per callable; each round calls every variant once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def per_layer(dense, fast, x, repeats, device) -> list[dict]:
    """Each deployed layer against the dense layer it replaces, on their own real inputs."""
    dense_in = capture_inputs(dense, x, (torch.nn.Conv2d, torch.nn.Linear))
    fast_in = capture_inputs(fast, x)
    rows = []
    with torch.inference_mode():
        for name, layer in fast.named_modules():
            if name not in fast_in or name not in dense_in:
                continue
            original = dense.get_submodule(name)
            t = time_interleaved({"dense": lambda: original(dense_in[name]),
                                  "fast": lambda: layer(fast_in[name])}, repeats, 2, device)
            rows.append({"layer": name, "plan": sgdet.fast.plan_label(layer.plan),
                         "dense_ms": 1e3 * t["dense"], "fast_ms": 1e3 * t["fast"],
                         "speedup": t["dense"] / t["fast"]})
    return rows


def onnx_timings(variants: dict, batches, repeats, warmup, threads) -> dict:
    from sgdet.export import export, load_runner
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in variants.items():
            path = os.path.join(folder, f"{name}.onnx")
            example = torch.randn(1, 3, 224, 224)
            info = export(model.cpu().eval(), path, "onnx", example)
            runners = {b: load_runner(path, "onnx", threads) for b in batches}
            out[name] = {"weights": info["weights"], "max_abs_diff": info["max_abs_diff"]}
            for b in batches:
                xb = torch.randn(b, 3, 224, 224)
                out[name][f"batch{b}_ms"] = 1e3 * time_interleaved({"x": lambda: runners[b](xb)},
                                                                   repeats, warmup, torch.device("cpu"))["x"]
    return out


def run_setting(arch, ratio, fc, groups, device, batches, repeats, warmup, calib_repeats,
                layers, onnx, threads, log) -> dict:
    torch.manual_seed(0)
    dense = sgdet.build(arch).eval()
    masked = copy.deepcopy(dense)
    sgdet.compress(masked, conv_ratio=ratio, fc_ratio=fc, groups=groups, step=None, seed=0)
    masked.eval()
    base, after = sgdet.count(dense, (3, 224, 224)), sgdet.count(masked, (3, 224, 224))
    exact = sgdet.deploy(masked).eval()
    calib_batch = max(batches)
    start = time.perf_counter()
    fast = sgdet.deploy(masked.to(device), optimize=True,
                        example_input=torch.randn(calib_batch, 3, 224, 224, device=device),
                        repeats=calib_repeats).eval()
    calib_s = time.perf_counter() - start
    report = fast.sgdet_fast_report
    plans: dict = {}
    for entry in report["layers"].values():
        plans[entry["plan"]] = plans.get(entry["plan"], 0) + 1
    variants = {"dense": dense, "masked": masked, "deployed": exact, "fast": fast}
    for m in variants.values():
        m.to(device)
    result = {"arch": arch, "conv_ratio": ratio, "fc_ratio": fc, "groups": groups, "device": str(device),
              "flops_dense": base["flops"], "flops_sg": after["flops"], "params_dense": base["params"],
              "params_sg": after["params"], "flop_ratio": base["flops"] / after["flops"],
              "fast_flops": sgdet.count_flops(fast, (3, 224, 224)), "fast_params": sgdet.count_params(fast),
              "dropped_channels": report["dropped_channels"], "plans": plans, "calibration_s": calib_s,
              "batches": {}}
    with torch.inference_mode():
        x = torch.randn(2, 3, 224, 224, device=device)
        ref = masked(x)
        result["max_abs_diff_fast"] = float((fast(x) - ref).abs().max())
        result["max_abs_diff_deployed"] = float((exact(x) - ref).abs().max())
        result["output_scale"] = float(ref.abs().max())
        for b in batches:
            xb = torch.randn(b, 3, 224, 224, device=device)
            t = time_interleaved({k: (lambda m=m: m(xb)) for k, m in variants.items()}, repeats, warmup, device)
            result["batches"][b] = {f"{k}_ms": 1e3 * v for k, v in t.items()}
            result["batches"][b].update({f"{k}_speedup": t["dense"] / v for k, v in t.items() if k != "dense"})
            log(f"{arch} Conv-{round(100 * ratio)} {device} batch {b}: " +
                ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in t.items()))
    if layers:
        result["layers"] = per_layer(dense, fast, torch.randn(calib_batch, 3, 224, 224, device=device),
                                     max(5, repeats // 2), device)
        result["worst_layer"] = min(result["layers"], key=lambda r: r["speedup"]) if result["layers"] else None
    if onnx and device.type == "cpu":
        result["onnxruntime"] = onnx_timings({"dense": dense, "deployed": exact, "fast": fast},
                                             batches, repeats, warmup, threads)
    return result


def machine_info(threads: int) -> dict:
    info = {"cpu_count": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
            "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}
    try:
        with open("/proc/cpuinfo") as handle:
            info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")), "")
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"# Deployment speed ({payload['label']})", "",
             f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads){', GPU ' + m['gpu'] if m.get('gpu') else ''}, "
             f"onnxruntime {m.get('onnxruntime', '-')}, {m['when']}. Random weights, one-shot compression, g = 16, "
             f"224 px; median of {payload['repeats']} interleaved runs after {payload['warmup']} warm-ups; "
             "speed-up = dense time / variant time.", "",
             "| Model | Device | Batch | FLOP ratio | dense ms | masked | deployed (exact) | fast | fast ms | target | plans |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        for b, t in r["batches"].items():
            target = TARGETS.get((r["arch"], r["conv_ratio"])) if r["device"] == "cpu" and int(b) == 8 else None
            verdict = "-" if target is None else f">= {target}x: {'met' if t['fast_speedup'] >= target else 'MISSED'}"
            plans = ", ".join(f"{k} {v}" for k, v in sorted(r["plans"].items()))
            lines.append(f"| {r['arch']} Conv-{round(100 * r['conv_ratio'])}/FC-{round(100 * r['fc_ratio'])} | "
                         f"{r['device']} | {b} | {r['flop_ratio']:.2f}x | {t['dense_ms']:.1f} | "
                         f"{t['masked_speedup']:.2f}x | {t['deployed_speedup']:.2f}x | {t['fast_speedup']:.2f}x | "
                         f"{t['fast_ms']:.1f} | {verdict} | {plans} |")
    ort_rows = [r for r in payload["results"] if r.get("onnxruntime")]
    if ort_rows:
        lines += ["", "onnxruntime (CPU, exported with `sgdet export`, same threads), speed-up over the dense export:", "",
                  "| Model | Batch | dense ms | deployed (exact) | fast | weights dense / deployed / fast |",
                  "|---|---|---|---|---|---|"]
        for r in ort_rows:
            o = r["onnxruntime"]
            for b in r["batches"]:
                d = o["dense"][f"batch{b}_ms"]
                lines.append(f"| {r['arch']} Conv-{round(100 * r['conv_ratio'])} | {b} | {d:.1f} | "
                             f"{d / o['deployed'][f'batch{b}_ms']:.2f}x | {d / o['fast'][f'batch{b}_ms']:.2f}x | "
                             f"{o['dense']['weights'] / 1e6:.2f}M / {o['deployed']['weights'] / 1e6:.2f}M / "
                             f"{o['fast']['weights'] / 1e6:.2f}M |")
    layer_rows = [r for r in payload["results"] if r.get("layers")]
    if layer_rows:
        lines += ["", "Per layer (fast layer vs the dense layer it replaces, on its real input, largest batch):", "",
                  "| Model | Device | layers | below 1.0x | worst layer | its plan | its speed-up | median layer speed-up |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in layer_rows:
            speeds = [x["speedup"] for x in r["layers"]]
            w = r["worst_layer"]
            lines.append(f"| {r['arch']} Conv-{round(100 * r['conv_ratio'])} | {r['device']} | {len(speeds)} | "
                         f"{sum(s < 1.0 for s in speeds)} | {w['layer']} | {w['plan']} | {w['speedup']:.2f}x | "
                         f"{statistics.median(speeds):.2f}x |")
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "densenet201"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.6, 0.7, 0.8])
    parser.add_argument("--fc-ratio", type=float, default=0.6)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped where absent")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calib-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer timings")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime timings")
    parser.add_argument("--label", default=None, help="free text naming the machine in the report")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "deploy_speed"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    log = lambda text: print(text, file=sys.stderr, flush=True)       # noqa: E731
    results = []
    payload = {"label": args.label or platform.node(), "machine": machine_info(args.threads),
               "repeats": args.repeats, "warmup": args.warmup, "results": results}
    for device in devices:
        for arch in args.archs:
            for ratio in args.ratios:
                results.append(run_setting(arch, ratio, args.fc_ratio, args.groups, device, args.batches,
                                           args.repeats, args.warmup, args.calib_repeats,
                                           not args.no_layers,
                                           not args.no_onnx, args.threads, log))
                # write as we go: a run cut short still leaves every finished setting behind
                write_atomic(args.out + ".json", json.dumps(payload, indent=1))
                write_atomic(args.out + ".md", markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
