"""The `compare` verb: SG-CNN against its rivals at the same budget, in one command.

One baseline (MODEL.WEIGHTS, or trained here for COMPARE.BASELINE_EPOCHS into ``baseline/``) is
compressed, for every COMPARE.RATIOS entry (the fraction of the baseline's params, or FLOPs with
COMPARE.BUDGET flops, that every method removes), by each of COMPARE.METHODS into
``OUTPUT_DIR/r<ratio>/<method>/``:

* ``sg``: self-grouping (k-means groups), the engine's ``CompressionRun`` with SG.SCHEME;
* ``fixed``: the same schedule with fixed equal groups (SG.GROUPING fixed, CondenseNet-style);
* ``unstructured``: L1 magnitude pruning with torch.nn.utils.prune (COMPARE.UNSTRUCTURED);
* ``channel``: structured channel pruning with Torch-Pruning (classification/rivals.py).

SG's layer ratio is solved so that the network meets the budget (its first conv stays dense);
every method prunes over the same steps with the same local and global fine-tuning epochs.
Counts come from the suite's one counter. Then every deployed form is timed on the CPU in one
interleaved run: SG as ``sgdet.deploy(optimize=True)`` (native kernels where built),
channel-pruned as the smaller dense net, unstructured and the baseline as dense nets. Outputs:
``compare.md``, ``compare.json``, ``compare.png`` (accuracy vs latency) and ``config.yaml``.
With --resume finished sub-runs are kept (SG ones also resume mid-run)."""
from __future__ import annotations

import copy
import logging
import os

import torch

import sgdet
from sgdet.config import save_config
from sgdet.counting import format_count
from sgdet.deploy.timing import time_interleaved
from sgdet.engine.compression import scheme_epochs
from sgdet.engine.distributed import DistContext
from sgdet.engine.reporting import epochs_string
from sgdet.errors import ConfigError
from sgdet.files import write_json, write_text
from sgdet.schedule import Schedule

from . import datasets as data_module
from .commands import make_trainer, resolve_num_classes, sub_config
from .model import build_model
from .rivals import Channel, RivalTrainer, Unstructured, load_finished, torch_pruning

log = logging.getLogger("classification")

NAMES = {"sg": "SG-CNN (k-means groups)", "fixed": "fixed equal groups",
         "unstructured": "unstructured L1", "channel": "channel (Torch-Pruning)"}


# ---------------------------------------------------------------------------------- budget

def prunable(model: torch.nn.Module, cfg) -> tuple[dict, dict]:
    """(the counts of ``model``, the part of them in the layers SG compresses: their weights
    and those weights' multiply-accumulates), both from the one counter."""
    size = tuple(int(v) for v in cfg.MODEL.INPUT_SIZE)
    trial = copy.deepcopy(model).cpu()
    layers = sgdet.convert(trial, list(cfg.SG.INCLUDE), list(cfg.SG.EXCLUDE))
    if not layers:
        raise ConfigError("the model has no compressible Conv2d/Linear layers")
    full = sgdet.count(trial, size)
    for layer in layers.values():
        layer.mask.zero_()
    rest = sgdet.count(trial, size)
    return full, {k: full[k] - rest[k] for k in full}


def sg_ratio(ratio: float, budget: str, full: dict, share: dict) -> float:
    """SG's layer ratio (conv = FC) that removes ``ratio`` of the network's ``budget``."""
    r = ratio * full[budget] / share[budget]
    if r >= 1:
        raise ConfigError(f"COMPARE.RATIOS {ratio:g} cannot be met: the layers SG compresses hold only "
                          f"{100 * share[budget] / full[budget]:.1f}% of the baseline's {budget} "
                          "(the first conv stays dense); lower it")
    return round(r, 6)


def step_fractions(schedule: Schedule) -> list[float]:
    """The share of the final budget each step of the SG schedule reaches (the rivals follow it)."""
    return [conv / schedule.goal for _, conv, _ in schedule]


# -------------------------------------------------------------------------------- the runs

def baseline(cfg, ctx: DistContext, resume: bool, datasets) -> tuple[str, dict]:
    """The baseline's weights file and its results row (trained when MODEL.WEIGHTS is empty)."""
    folder = os.path.join(str(cfg.OUTPUT_DIR), "baseline")
    if cfg.MODEL.WEIGHTS:
        sub = sub_config(cfg, [], folder, "COMPARE")
        trainer = make_trainer(sub, ctx, need_train=False, datasets=datasets)
        return str(cfg.MODEL.WEIGHTS), trainer.evaluate_run()
    if int(cfg.COMPARE.BASELINE_EPOCHS) == 0:
        raise ConfigError("compare needs MODEL.WEIGHTS or COMPARE.BASELINE_EPOCHS > 0 to train a baseline")
    sub = sub_config(cfg, ["SOLVER.EPOCHS", int(cfg.COMPARE.BASELINE_EPOCHS),
                           "SOLVER.LR", float(cfg.COMPARE.BASELINE_LR)], folder, "COMPARE")
    save_config(sub, folder)
    log.info("compare: training the baseline (%d epochs) in %s", int(sub.SOLVER.EPOCHS), folder)
    trainer = make_trainer(sub, ctx, datasets=datasets)
    row = trainer.train(resume=resume)
    return os.path.join(folder, trainer.final_name), row


def run_method(method: str, sub, ctx, resume: bool, datasets, plan: dict) -> tuple[torch.nn.Module, dict]:
    """One sub-run: (its final model, its results row)."""
    save_config(sub, str(sub.OUTPUT_DIR))
    if method in ("sg", "fixed"):
        trainer = make_trainer(sub, ctx, datasets=datasets)
        trainer.compress(resume=resume)
        return trainer.model, dict(trainer.state["final"])
    train_ds, val_ds = datasets
    num_classes = resolve_num_classes(sub)
    model, meta = build_model(sub, num_classes)
    if resume:
        done = load_finished(str(sub.OUTPUT_DIR), model)
        if done is not None:
            return done[0], dict(done[1]["row"])
    budget, base = str(sub.COMPARE.BUDGET), plan["full"]
    if method == "unstructured":
        rival = Unstructured(sub, budget, plan["ratio"] * base[budget], str(sub.COMPARE.UNSTRUCTURED))
    else:
        rival = Channel(sub, budget, (1 - plan["ratio"]) * base[budget], float(sub.COMPARE.TOLERANCE), base)
        rival.plan(model, tuple(int(v) for v in sub.MODEL.INPUT_SIZE))
    trainer = RivalTrainer(sub, model, train_ds, val_ds, ctx, weights_meta=meta, method=rival)
    row = trainer.run(plan["fractions"], plan["local"], plan["global"], plan["epochs"])
    return trainer.model, dict(row)


def _plan(cfg, ratio: float, full: dict, share: dict, base_epochs: str) -> dict:
    budget = str(cfg.COMPARE.BUDGET)
    r = sg_ratio(ratio, budget, full, share)
    schedule = Schedule(r, r, float(cfg.SG.STEP))
    local, global_ = scheme_epochs(cfg, int(cfg.SOLVER.EPOCHS))
    return {"ratio": ratio, "sg_ratio": r, "fractions": step_fractions(schedule), "local": local,
            "global": global_, "full": full,
            "epochs": epochs_string(base_epochs, schedule.steps, local, global_)}


def _folder(cfg, ratio: float, method: str) -> str:
    return os.path.join(str(cfg.OUTPUT_DIR), f"r{ratio:g}", method)


def run_compare(cfg, ctx: DistContext, resume: bool = False) -> dict:
    """Baseline, every method at every ratio, the interleaved timing and the reports."""
    if ctx.distributed:
        raise ConfigError("compare runs in one process; start it without torchrun")
    methods, ratios = list(cfg.COMPARE.METHODS), [float(r) for r in cfg.COMPARE.RATIOS]
    if "channel" in methods:
        torch_pruning()                            # missing package: say so before training
    datasets = data_module.build_datasets(cfg)
    weights, base_row = baseline(cfg, ctx, resume, datasets)
    base_cfg = sub_config(cfg, ["MODEL.WEIGHTS", weights], str(cfg.OUTPUT_DIR), "COMPARE")
    base_model, _ = build_model(base_cfg, resolve_num_classes(base_cfg))
    full, share = prunable(base_model, cfg)
    base_epochs = str(base_row.get("epochs") or "?").split("+")[0]
    budget = str(cfg.COMPARE.BUDGET)
    runs, models = [], {}
    for ratio in ratios:
        plan = _plan(cfg, ratio, full, share, base_epochs)
        log.info("compare: %.1f%% of the %s removed (SG layer ratio %.4f, %d step(s))",
                 100 * ratio, budget, plan["sg_ratio"], len(plan["fractions"]))
        for method in methods:
            overrides = ["MODEL.WEIGHTS", weights, "SG.CONV_RATIO", plan["sg_ratio"],
                         "SG.FC_RATIO", plan["sg_ratio"], "SG.GROUPING", "fixed" if method == "fixed" else "kmeans"]
            sub = sub_config(cfg, overrides, _folder(cfg, ratio, method), "COMPARE")
            log.info("compare: %s at %g -> %s", method, ratio, sub.OUTPUT_DIR)
            model, row = run_method(method, sub, ctx, resume, datasets, plan)
            achieved = 1 - row[budget] / full[budget]
            within = abs(achieved - ratio) <= float(cfg.COMPARE.TOLERANCE)
            if not within:
                log.warning("compare: %s at %g removed %.2f%% of the %s, off the budget by more than "
                            "COMPARE.TOLERANCE", method, ratio, 100 * achieved, budget)
            runs.append({"ratio": ratio, "method": method, "name": NAMES[method], "folder": str(sub.OUTPUT_DIR),
                         "model": row["model"], "params": row["params"], "flops": row["flops"],
                         "params_pruned": 1 - row["params"] / full["params"],
                         "flops_pruned": 1 - row["flops"] / full["flops"], "achieved": achieved,
                         "within_budget": within, "top1": row["top1"], "top5": row["top5"],
                         "epochs": row["epochs"], "sg_ratio": plan["sg_ratio"]})
            models[(ratio, method)] = model
    base = {"ratio": 0.0, "method": "baseline", "name": "baseline", "model": base_row["model"],
            "params": full["params"], "flops": full["flops"], "params_pruned": 0.0, "flops_pruned": 0.0,
            "top1": base_row["top1"], "top5": base_row["top5"], "epochs": base_row["epochs"],
            "folder": os.path.dirname(weights)}
    timing = time_forms(cfg, base_model, runs, models, [base])
    summary = {"budget": budget, "ratios": ratios, "tolerance": float(cfg.COMPARE.TOLERANCE),
               "arch": cfg.MODEL.ARCH, "data": cfg.DATA.NAME, "timing": timing, "baseline": base,
               "runs": runs}
    write_reports(cfg, summary)
    return summary


# ---------------------------------------------------------------------------------- timing

def deployed_form(method: str, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """The form a method deploys as, on the CPU, and its largest output difference from the
    trained model (0 where nothing is converted)."""
    model = model.cpu().eval()
    if method not in ("sg", "fixed"):
        return model, 0.0
    deployed = sgdet.deploy(model, optimize=True, example_input=x).eval()
    with torch.no_grad():
        error = float((deployed(x) - model(x)).abs().max())
    return deployed, error


def time_forms(cfg, base_model, runs: list[dict], models: dict, rows: list[dict]) -> dict:
    """Every deployed form timed on the CPU in one interleaved run (sgdet.deploy.timing);
    fills latency_ms and speedup into ``runs`` and ``rows`` (the baseline's)."""
    threads = int(cfg.COMPARE.TIMING_THREADS)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        size = tuple(int(v) for v in cfg.MODEL.INPUT_SIZE)
        x = torch.randn(int(cfg.COMPARE.TIMING_BATCH), *size, generator=torch.Generator().manual_seed(0))
        forms = {"baseline": base_model.cpu().eval()}
        for run in runs:
            key = f"{run['method']}@{run['ratio']:g}"
            forms[key], run["deploy_error"] = deployed_form(run["method"], models[(run["ratio"], run["method"])], x)

        def call(model):
            def forward():
                with torch.no_grad():
                    model(x)
            return forward
        log.info("compare: timing %d deployed forms on the CPU (batch %d, %d repeats, %d threads)",
                 len(forms), x.shape[0], int(cfg.COMPARE.TIMING_REPEATS), torch.get_num_threads())
        seconds = time_interleaved({k: call(m) for k, m in forms.items()},
                                   repeats=int(cfg.COMPARE.TIMING_REPEATS), warmup=2)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    for row in rows + runs:
        key = "baseline" if row["method"] == "baseline" else f"{row['method']}@{row['ratio']:g}"
        row["latency_ms"] = 1000 * seconds[key]
        row["speedup"] = seconds["baseline"] / seconds[key]
    native = sgdet.deploy.native.available()
    return {"device": "cpu", "batch": int(x.shape[0]), "repeats": int(cfg.COMPARE.TIMING_REPEATS),
            "threads": used, "native_kernels": bool(native), "torch": torch.__version__}


# --------------------------------------------------------------------------------- reports

def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def compare_table(summary: dict) -> str:
    """Markdown: the baseline, then each ratio's methods; '!' marks a run off the budget."""
    budget = summary["budget"]
    lines = [f"| Target ({budget} removed) | Method | Model | Params | FLOPs | Params pruned (%) | "
             "FLOPs pruned (%) | Top-1 (%) | Top-5 (%) | CPU latency (ms) | Speed-up | Epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in [summary["baseline"], *summary["runs"]]:
        target = "-" if row["method"] == "baseline" else f"{100 * row['ratio']:g}%"
        flag = "" if row.get("within_budget", True) else " !"
        lines.append(f"| {target} | {row['name']}{flag} | {row['model']} | {format_count(row['params'])} | "
                     f"{format_count(row['flops'])} | {_pct(row['params_pruned'])} | {_pct(row['flops_pruned'])} | "
                     f"{row['top1']:.2f} | {row['top5']:.2f} | {row['latency_ms']:.3f} | "
                     f"{row['speedup']:.2f}x | {row['epochs']} |")
    t = summary["timing"]
    lines += ["", f"Latency: median of {t['repeats']} interleaved CPU runs, batch {t['batch']}, "
              f"{t['threads']} thread(s), native kernels {'on' if t['native_kernels'] else 'unavailable'} "
              f"(torch {t['torch']}). '!' marks a run more than {100 * summary['tolerance']:g} points "
              "off its budget."]
    return "\n".join(lines) + "\n"


def plot_compare(summary: dict, path: str, title: str) -> str:
    """Top-1 against CPU latency: one line per method through its budgets, the baseline a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sgdet.visualize import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = {"sg": "o", "fixed": "s", "unstructured": "^", "channel": "D"}
    for i, method in enumerate(NAMES):
        runs = sorted((r for r in summary["runs"] if r["method"] == method), key=lambda r: r["ratio"])
        if not runs:
            continue
        xs, ys = [r["latency_ms"] for r in runs], [r["top1"] for r in runs]
        ax.plot(xs, ys, marker=markers[method], color=f"C{i}", label=NAMES[method])
        for r in runs:
            ax.annotate(f"{100 * r['ratio']:g}%", (r["latency_ms"], r["top1"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
    base = summary["baseline"]
    ax.plot([base["latency_ms"]], [base["top1"]], marker="*", markersize=12, color="k",
            linestyle="none", label="dense baseline")
    ax.set_xlabel(f"CPU latency (ms, batch {summary['timing']['batch']})")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def write_reports(cfg, summary: dict) -> None:
    out = str(cfg.OUTPUT_DIR)
    table = compare_table(summary)
    write_text(os.path.join(out, "compare.md"), table)
    write_json(os.path.join(out, "compare.json"), summary, indent=2)
    plot_compare(summary, os.path.join(out, "compare.png"),
                 f"{cfg.MODEL.ARCH} on {cfg.DATA.NAME}: accuracy vs CPU latency, same {summary['budget']} budget")
    log.info("compare table:\n%s", table)
    log.info("compare results in %s", out)
