"""The worked example of the transfer pipeline, end to end on a CPU with real data that exists
here: train LeNet-5 on Fashion-MNIST (the source domain), compress it with self-grouping (scheme
G) at two ratios, then adapt the dense and the compressed models to scikit-learn's handwritten
digits (the target domain) with the ``table`` verb: a new dense 10-way head, every other layer's
groups and masks kept, the same recipe (configs/transfer/example_digits.yaml) for every model.

Outputs under ``--out``: ``source/`` (the three source runs and their checkpoints),
``<checkpoint>/`` (one fine-tuning run each), ``table.md`` / ``table.json`` / ``table.png``
(Table 5 style), ``source.md`` (the source models on Fashion-MNIST) and ``summary.json`` (the
mask check and timings)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

import torch

import sgdet
from classification import commands as classification
from classification.config import get_defaults as classification_defaults
from sgdet.engine.reporting import RESULTS_HEADER
from sgdet.config import load_config

from .head import find_head
from .report import write_text

log = logging.getLogger("transfer")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(HERE, "configs", "transfer", "example_digits.yaml")
RATIOS = (0.8, 0.95)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/transfer_example", metavar="DIR", help="output folder")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="Fashion-MNIST root (default: Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--config", default=CONFIG, metavar="FILE",
                   help="the transfer recipe (default: configs/transfer/example_digits.yaml)")
    p.add_argument("--source-epochs", type=int, default=1, help="LeNet-5 epochs on Fashion-MNIST")
    p.add_argument("--source-images", type=int, default=12000,
                   help="Fashion-MNIST training images used (0: all 60,000; the default keeps the "
                        "example to a few minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)


def _source_config(out: str, args, overrides: list) -> object:
    base = ["OUTPUT_DIR", out, "SEED", args.seed, "DEVICE", "cpu", "MODEL.ARCH", "lenet5",
            "MODEL.NUM_CLASSES", 10, "MODEL.INPUT_SIZE", [1, 28, 28], "DATA.NAME", "fashion-mnist",
            "DATA.ROOT", args.data or "", "DATA.BATCH_SIZE", 128, "DATA.TEST_BATCH_SIZE", 1000,
            "DATA.WORKERS", 0, "DATA.LIMIT_TRAIN", args.source_images, "SOLVER.EPOCHS", args.source_epochs, "SOLVER.LR", 0.05,
            "SOLVER.SCHEDULE", "constant", "SOLVER.EVAL_PERIOD", 0]
    cfg = load_config(classification_defaults(), None, [str(v) if not isinstance(v, str) else v
                                                        for v in base + overrides])
    classification.validate_config(cfg)
    return cfg


def run(args) -> dict:
    from . import commands

    started = time.time()
    out = args.out
    if args.source_epochs < 1 or args.source_images < 0:
        raise sgdet.ConfigError("--source-epochs must be >= 1 and --source-images >= 0")
    cfg = commands.load(args.config, ["OUTPUT_DIR", out, "SEED", str(args.seed)])
    with classification.session(cfg) as ctx:
        # the source domain first: fails with one line if Fashion-MNIST is not installed
        source_cfg = _source_config(os.path.join(out, "source", "baseline"), args, [])
        fashion = classification.data_module.build_datasets(source_cfg)
        log.info("source: Fashion-MNIST, %d train / %d test images", len(fashion[0]), len(fashion[1]))
        timings = {}
        t0 = time.time()
        trainer = classification.make_trainer(source_cfg, ctx, datasets=fashion)
        rows = [trainer.train()]
        timings["source_train_s"] = round(time.time() - t0, 1)
        checkpoints = [os.path.join(out, "source", "lenet5_baseline.sg.pt")]
        shutil.copyfile(os.path.join(source_cfg.OUTPUT_DIR, "model_final.sg.pt"), checkpoints[0])
        for ratio in RATIOS:
            pct = round(100 * ratio)
            t0 = time.time()
            sub = _source_config(os.path.join(out, "source", f"g{pct}"), args, [
                "MODEL.WEIGHTS", checkpoints[0], "SG.SCHEME", "G", "SG.CONV_RATIO", ratio,
                "SG.FC_RATIO", ratio, "SG.GROUPS", 8, "SG.STEP", 0.2,
                "SG.EVAL_EACH_STEP", "False", "SOLVER.EPOCHS", 1, "SOLVER.LR", 0.01])
            trainer = classification.run_compress(sub, ctx, datasets=fashion)
            rows.append(trainer.state["final"])
            path = os.path.join(out, "source", f"lenet5_g_conv{pct}_fc{pct}.sg.pt")
            shutil.copyfile(os.path.join(sub.OUTPUT_DIR, "model_final.sg.pt"), path)
            checkpoints.append(path)
            timings[f"source_compress_{pct}_s"] = round(time.time() - t0, 1)
        source_md = RESULTS_HEADER + "".join(
            f"| {r['model']} | {sgdet.counting.format_count(r['params'], 'K')} | "
            f"{sgdet.counting.format_count(r['flops'], 'K')} | {r['top1']:.2f} | {r['top5']:.2f} | "
            f"{r['epochs']} |\n" for r in rows)
        write_text(os.path.join(out, "source.md"), source_md)
        log.info("source models on Fashion-MNIST:\n%s", source_md)

        # the target domain: the table verb, one recipe for every model
        t0 = time.time()
        table_rows = commands.table(cfg, ctx, checkpoints, out)
        timings["transfer_s"] = round(time.time() - t0, 1)

        # what the transfer promised: groups and masks unchanged, pruned weights exactly zero
        checks = []
        for path, row in zip(checkpoints, table_rows):
            source = sgdet.load(path)
            tuned = sgdet.load(os.path.join(row["folder"], "model_final.sg.pt"))
            before, after = _structure(source), _structure(tuned)
            head_name = find_head(tuned)
            head = tuned.get_submodule(head_name)
            checks.append({
                "model": row["model"], "sg_layers_kept": len(after),
                "groups_and_masks_unchanged": all(
                    torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1])
                    for n in after) and set(after) == set(before) - {head_name},
                "pruned_weights_zero": all(float(m.weight[~m.weight_mask().expand_as(m.weight)].abs().sum()) == 0
                                           for m in sgdet.sg_layers(tuned).values()),
                "head": f"{type(head).__name__}({head.in_features}, {head.out_features})"})
        timings["total_s"] = round(time.time() - started, 1)
        summary = {"source": rows, "transfer": table_rows, "checks": checks, "timings": timings,
                   "threads": torch.get_num_threads()}
        write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
        for c in checks:
            log.info("%s: %d SG layers, groups and masks unchanged: %s, pruned weights zero: %s, head %s",
                     c["model"], c["sg_layers_kept"], c["groups_and_masks_unchanged"],
                     c["pruned_weights_zero"], c["head"])
        log.info("example done in %.0f s: %s", timings["total_s"], os.path.join(out, "table.md"))
    return summary


def _structure(model) -> dict:
    return {n: (m.group.clone(), m.mask.clone()) for n, m in sgdet.sg_layers(model).items()}
