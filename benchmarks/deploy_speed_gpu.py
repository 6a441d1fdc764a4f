"""Benchmark, deployment stage, the GPU protocol of deploy_speed.py (``--device cuda``, issue 17):
per dtype (float16, float32) and batch size (8, 64), the dense model against the fast deployed
model (sgdet.deploy(..., optimize=True) tuned on an input of that dtype, batch and layout, where
the Triton kernel competes per layer with cuDNN and the torch plans), both channels_last and each
run eager and under torch.compile; speed-up = the faster dense form over the faster deployed form.
All forms of one (dtype, batch) are timed interleaved round by round (CUDA synchronised around
every call). cuDNN autotuning is on for every form; TF32 follows torch's defaults (recorded).

Runs on any device (``--protocol gpu`` on the CPU checks this code without a GPU); the figures mean
something on a GPU only. Aim (issue 17, GPU, batch 64, float16): ResNet50 Conv-80 >= 1.5x."""
from __future__ import annotations

import copy
import time

import torch

import sgdet
from sgdet.deploy.timing import time_interleaved

AIMS = {("resnet50", 0.8, "float16", 64): 1.5}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _compiled(model, mode: str, x, log, name: str):
    """``model`` under torch.compile, compiled by one call on ``x``; (None, reason) where it fails."""
    try:
        compiled = torch.compile(model, mode=None if mode == "default" else mode)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        log(f"  compiled {name} in {time.perf_counter() - start:.0f} s")
        return compiled, None
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the eager form still runs
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log(f"  torch.compile of {name} failed: {reason}")
        return None, reason


def _max_diff(model, reference, x) -> float:
    with torch.inference_mode():
        return float((model(x).float() - reference).abs().max())


def run_gpu_setting(arch, ratio, fc, groups, device, batches, dtypes, repeats, warmup, calib_repeats,
                    compile_mode, per_layer, log) -> dict:
    """One (arch, ratio) setting on ``device``; ``per_layer(dense, fast, x, repeats, device)`` (from
    deploy_speed) times each deployed layer against its dense one at the largest batch, or None."""
    torch.manual_seed(0)
    dense = sgdet.build(arch).eval()
    masked = copy.deepcopy(dense)
    sgdet.compress(masked, conv_ratio=ratio, fc_ratio=fc, groups=groups, step=None, seed=0)
    masked.eval()
    base, after = sgdet.count(dense, (3, 224, 224)), sgdet.count(masked, (3, 224, 224))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"protocol": "gpu", "arch": arch, "conv_ratio": ratio, "fc_ratio": fc, "groups": groups,
              "device": str(device), "memory_format": "channels_last",
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
              "compile_mode": compile_mode, "flops_dense": base["flops"], "flops_sg": after["flops"],
              "flop_ratio": base["flops"] / after["flops"], "params_dense": base["params"],
              "params_sg": after["params"], "runs": []}
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)          # noqa: E731
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        dense_d = copy.deepcopy(dense).to(device, dtype).to(memory_format=torch.channels_last)
        masked_d = copy.deepcopy(masked).to(device, dtype).to(memory_format=torch.channels_last)
        for b in batches:
            x = cl(torch.randn(b, 3, 224, 224, device=device, dtype=dtype))
            start = time.perf_counter()
            fast = sgdet.deploy(masked_d, optimize=True, example_input=x, repeats=calib_repeats).eval()
            calib_s = time.perf_counter() - start
            report = fast.sgdet_fast_report
            plans: dict = {}
            for entry in report["layers"].values():
                plans[entry["plan"]] = plans.get(entry["plan"], 0) + 1
            with torch.inference_mode():
                reference = masked_d(x).float()
            run = {"dtype": dtype_name, "batch": b, "calibration_s": calib_s, "plans": plans,
                   "tuned_kept": report.get("verified", {}).get("kept"),
                   "folded_norms": report.get("folded_norms", 0), "fused_blocks": report.get("fused_blocks", 0),
                   "native_dense_convs": len(report.get("native_dense_convs", [])),
                   "output_scale": float(reference.abs().max()), "max_abs_diff_fast": _max_diff(fast, reference, x),
                   "compile_errors": {}}
            forms = {"dense_eager": dense_d, "fast_eager": fast}
            if compile_mode != "off":
                for name, model in (("dense_compiled", dense_d), ("fast_compiled", fast)):
                    compiled, error = _compiled(model, compile_mode, x, log, f"{arch} {name} {dtype_name} b{b}")
                    if compiled is None:
                        run["compile_errors"][name] = error
                    else:
                        forms[name] = compiled
                if "fast_compiled" in forms:
                    run["max_abs_diff_fast_compiled"] = _max_diff(forms["fast_compiled"], reference, x)
            with torch.inference_mode():
                seconds = time_interleaved({k: (lambda m=m: m(x)) for k, m in forms.items()},
                                           repeats, warmup, device)
            run.update({f"{k}_ms": 1e3 * v for k, v in seconds.items()})
            best_dense = min((k for k in seconds if k.startswith("dense")), key=seconds.get)
            best_fast = min((k for k in seconds if k.startswith("fast")), key=seconds.get)
            run.update(best_dense=best_dense, best_fast=best_fast, speedup=seconds[best_dense] / seconds[best_fast])
            if per_layer is not None and b == max(batches):
                run["layers"] = per_layer(dense_d, fast, x, max(5, repeats // 2), device)
                run["layers_below_dense"] = sum(r["speedup"] < 1.0 for r in run["layers"])
            result["runs"].append(run)
            log(f"{arch} Conv-{round(100 * ratio)} {device} {dtype_name} batch {b}: " +
                ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in seconds.items()) +
                f" -> {run['speedup']:.2f}x")
            del forms, fast
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def gpu_markdown(results: list[dict]) -> list[str]:
    """The GPU protocol's table (lines), empty without such results."""
    if not results:
        return []
    lines = ["", "GPU protocol (deploy_speed.py --device cuda): dense and fast deployed models channels_last, "
             "each eager and torch.compiled; speed-up = faster dense form / faster fast form, timed "
             "interleaved in one run. Per layer: deployed layers slower than the dense layer they replace.", "",
             "| Model | GPU | dtype | Batch | FLOP ratio | dense eager ms | dense compiled ms | fast eager ms | "
             "fast compiled ms | speed-up | aim | layers < 1.0x | plans | max abs diff / scale |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for run in r["runs"]:
            aim = AIMS.get((r["arch"], r["conv_ratio"], run["dtype"], run["batch"]))
            verdict = "-" if aim is None else f">= {aim}x: {'met' if run['speedup'] >= aim else 'MISSED'}"
            plans = ", ".join(f"{k} {v}" for k, v in sorted(run["plans"].items()))
            if run.get("tuned_kept") is False:
                plans += " (whole-model check fell back to these)"
            ms = lambda k: f"{run[k]:.2f}" if k in run else "failed" if k in run["compile_errors"] else "-"  # noqa: E731
            below = run.get("layers_below_dense", "-")
            lines.append(f"| {r['arch']} Conv-{round(100 * r['conv_ratio'])}/FC-{round(100 * r['fc_ratio'])} | "
                         f"{r.get('gpu') or r['device']} | {run['dtype']} | {run['batch']} | {r['flop_ratio']:.2f}x | "
                         f"{ms('dense_eager_ms')} | {ms('dense_compiled_ms')} | {ms('fast_eager_ms')} | "
                         f"{ms('fast_compiled_ms')} | {run['speedup']:.2f}x | {verdict} | {below} | {plans} | "
                         f"{run['max_abs_diff_fast'] / max(1.0, run['output_scale']):.1e} |")
    return lines
