"""Benchmark, deployment stage: latency of the dense baseline, the masked model, the exact deployed
model and the fast deployed model (sgdet.deploy(..., optimize=True), plans timed on the device)
of ResNet50 and DenseNet201 at Conv-60/70/80 / FC-60, g = 16, 224 px, batch 1 and 8; plus
onnxruntime timings of the exported dense, deployed and fast models, and per-layer speed-ups.

All variants of one setting are timed in the same run, interleaved round by round in a shuffled
order (warm-up, then the median of the repeats). The exact per-group model is timed in a pass of
its own against the dense baseline: a call right after it runs ~25 % slower, which biased the
variant the seeded order put after it most often. The dense baseline is timed in both layouts
(NCHW and channels_last) and speed-ups are taken over the faster one, so no gain is credited to
the layout alone. Weights are random (kaiming init, seeded); compression is one-shot.
Writes <out>.json and <out>.md (default benchmarks/results/deploy_speed). Targets (issue 4, CPU,
batch 8, whole network vs dense): never below 1.0x for a model or a layer; ResNet50 Conv-60/FC-60
>= 1.3x, Conv-80/FC-60 >= 1.6x.

On a GPU (``--device cuda``) the settings run the GPU protocol of deploy_speed_gpu.py instead:
float16 and float32, dense and fast models each eager and torch.compiled (``--dtypes``,
``--compile-mode``), e.g. ``--device cuda --batches 8 64``."""
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
from sgdet.deploy.optimize import capture_inputs
from sgdet.deploy.plans import plan_label
from sgdet.deploy.timing import time_interleaved
from sgdet.files import write_text

TARGETS = {("resnet50", 0.6): 1.3, ("resnet50", 0.8): 1.6}


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
            rows.append({"layer": name, "plan": plan_label(layer.plan),
                         "dense_ms": 1e3 * t["dense"], "fast_ms": 1e3 * t["fast"],
                         "speedup": t["dense"] / t["fast"]})
    return rows


def plan_ceiling(candidates: dict) -> dict:
    """What an ideal per-layer choice could give: the summed layer times on dense plans against
    the summed times of each layer's fastest calibrated plan (the calibration's own timings)."""
    dense = sum(c["dense"] for c in candidates.values())
    best = sum(min(c.values()) for c in candidates.values())
    wins = sorted(((c["dense"] / min(c.values()), name) for name, c in candidates.items()), reverse=True)
    return {"dense_s": dense, "best_s": best, "speedup": dense / best if best else 1.0,
            "top_layers": [{"layer": n, "speedup": r} for r, n in wins[:5]]}


def onnx_timings(variants: dict, batches, repeats, warmup, threads) -> dict:
    """Export every variant, then time them interleaved per batch size, one session each."""
    from sgdet.deploy.export import export, load_runner
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        runners = {}
        for name, model in variants.items():
            path = os.path.join(folder, f"{name}.onnx")
            info = export(model.cpu().eval(), path, "onnx", torch.randn(1, 3, 224, 224))
            runners[name] = load_runner(path, "onnx", threads)
            out[name] = {"weights": info["weights"], "max_abs_diff": info["max_abs_diff"]}
        for b in batches:
            xb = torch.randn(b, 3, 224, 224)
            call = lambda n: (lambda r=runners[n]: r(xb))                 # noqa: E731
            t = time_interleaved({n: call(n) for n in runners if n != "deployed"}, repeats, warmup,
                                 torch.device("cpu"))
            for name, seconds in t.items():
                out[name][f"batch{b}_ms"] = 1e3 * seconds
            if "deployed" in runners:       # in a pass of its own, as in run_setting
                te = time_interleaved({"dense": call("dense"), "deployed": call("deployed")}, repeats, warmup,
                                      torch.device("cpu"))
                out["deployed"][f"batch{b}_ms"] = 1e3 * te["deployed"]
                out["deployed"][f"batch{b}_dense_ms"] = 1e3 * te["dense"]
    return out


def run_setting(arch, ratio, fc, groups, device, batches, repeats, warmup, calib_repeats,
                layers, onnx, threads, log, memory_format=torch.channels_last, exact_variant=True) -> dict:
    torch.manual_seed(0)
    dense = sgdet.build(arch).eval()
    masked = copy.deepcopy(dense)
    sgdet.compress(masked, conv_ratio=ratio, fc_ratio=fc, groups=groups, step=None, seed=0)
    masked.eval()
    base, after = sgdet.count(dense, (3, 224, 224)), sgdet.count(masked, (3, 224, 224))
    exact = sgdet.deploy(masked).eval() if exact_variant else None
    calib_batch = max(batches)
    layout = lambda t: t.contiguous(memory_format=memory_format)         # noqa: E731
    # plans are tuned on the batch size they will run at, as a deployment would be
    fast_models, calib_s, plans, kept, calibration = {}, {}, {}, {}, {}
    for b in batches:
        start = time.perf_counter()
        fast_models[b] = sgdet.deploy(masked.to(device).to(memory_format=memory_format), optimize=True,
                                      example_input=layout(torch.randn(b, 3, 224, 224, device=device)),
                                      repeats=calib_repeats).eval()
        calib_s[b] = time.perf_counter() - start
        plans[b] = {}
        kept[b] = fast_models[b].sgdet_fast_report.get("verified", {}).get("kept")
        calibration[b] = {name: entry["candidates"] for name, entry in
                          fast_models[b].sgdet_fast_report["layers"].items()}
        for entry in fast_models[b].sgdet_fast_report["layers"].values():
            plans[b][entry["plan"]] = plans[b].get(entry["plan"], 0) + 1
    fast = fast_models[calib_batch]
    report = fast.sgdet_fast_report
    # the dense baseline in both layouts: a speed-up must not come from the layout alone
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    variants = {"dense": dense, "dense_cl": dense_cl, "masked": masked, "deployed": exact, "fast": fast}
    variants = {k: m.to(device) for k, m in variants.items() if m is not None}
    formats = {k: (torch.contiguous_format if k == "dense" else torch.channels_last if k == "dense_cl"
                   else memory_format) for k in variants}
    for k, m in variants.items():
        m.to(memory_format=formats[k])
    for m in fast_models.values():
        m.to(device).to(memory_format=memory_format)
    result = {"arch": arch, "conv_ratio": ratio, "fc_ratio": fc, "groups": groups, "device": str(device),
              "memory_format": str(memory_format).replace("torch.", ""),
              "flops_dense": base["flops"], "flops_sg": after["flops"], "params_dense": base["params"],
              "params_sg": after["params"], "flop_ratio": base["flops"] / after["flops"],
              "fast_flops": sgdet.count_flops(fast, (3, 224, 224)), "fast_params": sgdet.count_params(fast),
              "dropped_channels": report["dropped_channels"], "ungathered_norms": report["ungathered_norms"],
              "plans": plans, "tuned_kept": kept, "calibration_s": calib_s,
              "calibration": calibration, "ceiling": {b: plan_ceiling(c) for b, c in calibration.items()},
              "batches": {}}
    with torch.inference_mode():
        x = torch.randn(2, 3, 224, 224, device=device)
        ref = masked(layout(x))
        result["max_abs_diff_fast"] = float((fast(layout(x)) - ref).abs().max())
        if exact is not None:
            result["max_abs_diff_deployed"] = float((exact(layout(x)) - ref).abs().max())
        result["output_scale"] = float(ref.abs().max())
        for b in batches:
            xb = torch.randn(b, 3, 224, 224, device=device)
            inputs = {k: xb.contiguous(memory_format=f) for k, f in formats.items()}
            models = {**variants, "fast": fast_models[b]}
            call = lambda k: (lambda m=models[k]: m(inputs[k]))          # noqa: E731
            t = time_interleaved({k: call(k) for k in models if k != "deployed"}, repeats, warmup, device)
            best = min(("dense", "dense_cl"), key=t.get)
            row = {f"{k}_ms": 1e3 * v for k, v in t.items()}
            row["best_dense"] = best
            row.update({f"{k}_speedup": t[best] / v for k, v in t.items()})
            if "deployed" in models:
                # the exact per-group model gets its own pass against the faster dense layout:
                # it slows whatever runs right after it (memory churn), which in one rotation
                # biased whichever variant the seeded order put there most often
                te = time_interleaved({best: call(best), "deployed": call("deployed")}, repeats, warmup, device)
                row["deployed_ms"], row["deployed_dense_ms"] = 1e3 * te["deployed"], 1e3 * te[best]
                row["deployed_speedup"] = te[best] / te["deployed"]
            result["batches"][b] = row
            log(f"{arch} Conv-{round(100 * ratio)} {device} batch {b}: " +
                ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in t.items()))
    if layers:
        baseline = dense_cl if memory_format == torch.channels_last else dense
        result["layers"] = per_layer(baseline, fast, layout(torch.randn(calib_batch, 3, 224, 224, device=device)),
                                     max(5, repeats // 2), device)
        result["worst_layer"] = min(result["layers"], key=lambda r: r["speedup"]) if result["layers"] else None
    if onnx and device.type == "cpu":
        onnx_variants = {"dense": dense, "deployed": exact, "fast": fast}
        result["onnxruntime"] = onnx_timings({k: m for k, m in onnx_variants.items() if m is not None},
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
        info["cuda"] = torch.version.cuda
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def markdown(payload: dict) -> str:
    gpu_results = [r for r in payload["results"] if r.get("protocol") == "gpu"]
    payload = {**payload, "results": [r for r in payload["results"] if r.get("protocol") != "gpu"]}
    m = payload["machine"]
    if gpu_results and not payload["results"]:        # a GPU run: its own table only
        from deploy_speed_gpu import gpu_markdown
        head = (f"Machine: {m.get('gpu', 'no GPU')} (CUDA {m.get('cuda', '-')}), {m.get('cpu_model', m['processor'])}, "
                f"torch {m['torch']}, {m['when']}. Random weights, one-shot compression, g = 16, 224 px; median of "
                f"{payload['repeats']} interleaved runs after {payload['warmup']} warm-ups.")
        return "\n".join([f"# Deployment speed ({payload['label']})", "", head] + gpu_markdown(gpu_results)) + "\n"
    lines = [f"# Deployment speed ({payload['label']})", "",
             f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads){', GPU ' + m['gpu'] if m.get('gpu') else ''}, "
             f"onnxruntime {m.get('onnxruntime', '-')}, {m['when']}. Random weights, one-shot compression, g = 16, "
             f"224 px; median of {payload['repeats']} interleaved runs after {payload['warmup']} warm-ups; "
             "speed-up = dense time / variant time.", "",
             "Speed-ups are over the faster of the two dense layouts (NCHW as built, channels_last), timed "
             "in the same run; masked, deployed and fast run in the layout the table names. The exact deployed "
             "model is timed in a pass of its own against the faster dense layout (a call right after it runs "
             "slower). The fast model is "
             "tuned (sgdet.deploy(..., optimize=True, example_input=x)) on an input of the batch size it is "
             "timed at; its tuned plans are kept only if the whole tuned model beats the same model on dense "
             "plans by the 5 % margin, otherwise every layer falls back to its dense plan.", "",
             "| Model | Device | Layout | Batch | FLOP ratio | dense NCHW ms | dense channels_last ms | masked | "
             "deployed (exact) | fast | fast ms | target | plans |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        for b, t in r["batches"].items():
            target = TARGETS.get((r["arch"], r["conv_ratio"])) if r["device"] == "cpu" and int(b) == 8 else None
            verdict = "-" if target is None else f">= {target}x: {'met' if t['fast_speedup'] >= target else 'MISSED'}"
            tuned = r["plans"].get(b, r["plans"].get(str(b), {}))          # plans tuned at this batch
            plans = ", ".join(f"{k} {v}" for k, v in sorted(tuned.items()))
            if r.get("tuned_kept", {}).get(b, r.get("tuned_kept", {}).get(str(b))) is False:
                plans += " (whole-model check fell back to these)"
            exact = f"{t['deployed_speedup']:.2f}x" if "deployed_speedup" in t else "not run"
            lines.append(f"| {r['arch']} Conv-{round(100 * r['conv_ratio'])}/FC-{round(100 * r['fc_ratio'])} | "
                         f"{r['device']} | {r.get('memory_format', 'contiguous_format')} | {b} | "
                         f"{r['flop_ratio']:.2f}x | {t['dense_ms']:.1f} | {t.get('dense_cl_ms', float('nan')):.1f} | "
                         f"{t['masked_speedup']:.2f}x | {exact} | {t['fast_speedup']:.2f}x | "
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
                exact = o.get("deployed")
                lines.append(f"| {r['arch']} Conv-{round(100 * r['conv_ratio'])} | {b} | {d:.1f} | "
                             + (f"{exact.get(f'batch{b}_dense_ms', d) / exact[f'batch{b}_ms']:.2f}x | "
                                if exact else "not run | ")
                             + f"{d / o['fast'][f'batch{b}_ms']:.2f}x | {o['dense']['weights'] / 1e6:.2f}M / "
                             + (f"{exact['weights'] / 1e6:.2f}M" if exact else "-")
                             + f" / {o['fast']['weights'] / 1e6:.2f}M |")
    ceiling_rows = [r for r in payload["results"] if r.get("ceiling")]
    if ceiling_rows:
        lines += ["", "Calibration ceiling (sum of the deployed layers' times when each runs its fastest "
                  "calibrated plan, over the sum on dense plans; the rest of the network is not in it):", "",
                  "| Model | Batch | layers on dense plans ms | each layer's best plan ms | ceiling | best layers |",
                  "|---|---|---|---|---|---|"]
        for r in ceiling_rows:
            for b, c in r["ceiling"].items():
                top = ", ".join(f"{t['layer']} {t['speedup']:.2f}x" for t in c["top_layers"][:3])
                lines.append(f"| {r['arch']} Conv-{round(100 * r['conv_ratio'])} | {b} | {1e3 * c['dense_s']:.1f} | "
                             f"{1e3 * c['best_s']:.1f} | {c['speedup']:.2f}x | {top} |")
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
    from deploy_speed_gpu import gpu_markdown
    return "\n".join(lines + gpu_markdown(gpu_results)) + "\n"


def resumed_run(path: str, repeats: int, warmup: int, threads: int) -> dict:
    """The finished settings of an earlier run of the same protocol, to continue it."""
    if not os.path.exists(path):
        return {"results": []}
    try:
        with open(path) as handle:
            earlier = json.load(handle)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --resume: cannot read {path}: {error}")
    protocol = (earlier.get("repeats"), earlier.get("warmup"), earlier.get("machine", {}).get("torch_threads"))
    if protocol != (repeats, warmup, threads):
        raise SystemExit(f"error: --resume: {path} was run with repeats/warmup/threads {protocol}, "
                         f"not {(repeats, warmup, threads)}")
    return earlier


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "densenet201"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.6, 0.7, 0.8])
    parser.add_argument("--fc-ratio", type=float, default=0.6)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped where absent")
    parser.add_argument("--device", default=None, help="run on this device only (cuda: an error where absent)")
    parser.add_argument("--protocol", choices=["auto", "cpu", "gpu"], default="auto",
                        help="auto: the GPU protocol (deploy_speed_gpu.py) on CUDA, the CPU one elsewhere")
    parser.add_argument("--dtypes", nargs="+", choices=["float16", "float32", "bfloat16"],
                        default=["float16", "float32"], help="GPU protocol: activation/weight dtypes")
    parser.add_argument("--compile-mode", default="default",
                        help="GPU protocol: torch.compile mode for dense and fast (default, reduce-overhead, "
                             "max-autotune, ...; off: eager only)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calib-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer timings")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime timings")
    parser.add_argument("--no-exact", action="store_true",
                        help="skip the exact (per-group) deployed model, 10-20x slower than dense on a CPU")
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last",
                        help="layout the masked, deployed and fast models run (and are tuned) in; the dense "
                             "baseline is always timed in both")
    parser.add_argument("--label", default=None, help="free text naming the machine in the report")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "deploy_speed"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the settings <out>.json already holds and run only the missing ones "
                             "(a run cut short; repeats, warm-up and threads must match)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device is not None:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            sys.exit(f"deploy_speed: error: --device {args.device} but no CUDA device is available")
        args.devices = [args.device]
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    log = lambda text: print(text, file=sys.stderr, flush=True)       # noqa: E731
    results = []
    payload = {"label": args.label or platform.node(), "machine": machine_info(args.threads),
               "repeats": args.repeats, "warmup": args.warmup, "results": results}
    if args.resume:
        earlier = resumed_run(args.out + ".json", args.repeats, args.warmup, args.threads)
        results.extend(earlier["results"])
        if earlier["results"]:
            payload["machine"]["when"] = f"{earlier['machine']['when']}, resumed {payload['machine']['when']}"
    done = {(r["device"], r["arch"], r["conv_ratio"]) for r in results}
    for device in devices:
        for arch in args.archs:
            for ratio in args.ratios:
                if (str(device), arch, ratio) in done:
                    log(f"{arch} Conv-{round(ratio * 100)} {device}: kept from {args.out}.json")
                    continue
                if args.protocol == "gpu" or (args.protocol == "auto" and device.type == "cuda"):
                    from deploy_speed_gpu import run_gpu_setting
                    results.append(run_gpu_setting(arch, ratio, args.fc_ratio, args.groups, device, args.batches,
                                                   args.dtypes, args.repeats, args.warmup, args.calib_repeats,
                                                   args.compile_mode, None if args.no_layers else per_layer, log))
                    write_text(args.out + ".json", json.dumps(payload, indent=1))
                    write_text(args.out + ".md", markdown(payload))
                    continue
                results.append(run_setting(arch, ratio, args.fc_ratio, args.groups, device, args.batches,
                                           args.repeats, args.warmup, args.calib_repeats,
                                           not args.no_layers,
                                           not args.no_onnx, args.threads, log,
                                           torch.channels_last if args.memory_format == "channels_last"
                                           else torch.contiguous_format,
                                           not args.no_exact))
                # write as we go: a run cut short still leaves every finished setting behind
                write_text(args.out + ".json", json.dumps(payload, indent=1))
                write_text(args.out + ".md", markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
