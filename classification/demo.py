"""The main job (`make demo`): LeNet-5 on the real Fashion-MNIST. Train the baseline, compress it
with self-grouping step by step with local fine-tuning (Algorithm 1, scheme LG), fine-tune each
compression level globally, deploy it as diverse group convolutions, and write a LeNet table,
checkpoints and a picture of the group structure under one output folder."""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time

import numpy as np
import torch

import sgdet
from sgdet.counting import format_count
from sgdet.visualize import plot_group_structure

from .config import get_defaults
from .mnist import find_mnist_root, load_mnist_style
from .datasets import build_datasets
from sgdet.engine.distributed import DistContext
from sgdet.engine.reporting import setup_logging, teardown_logging
from sgdet.engine.trainer import Trainer
from sgdet.files import write_text


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def demo_config(args: argparse.Namespace, root: str):
    """The engine's config for the demo: LeNet-5, Fashion-MNIST, single process, CPU or GPU."""
    cfg = get_defaults()
    cfg.OUTPUT_DIR = args.out
    cfg.SEED = args.seed
    cfg.MODEL.ARCH, cfg.MODEL.NUM_CLASSES, cfg.MODEL.INPUT_SIZE = "lenet5", 10, [1, 28, 28]
    cfg.DATA.NAME, cfg.DATA.ROOT, cfg.DATA.WORKERS = "fashion-mnist", root, 0
    cfg.DATA.BATCH_SIZE, cfg.DATA.TEST_BATCH_SIZE = args.batch_size, 1000
    cfg.DATA.LIMIT_TRAIN = args.limit or 0
    cfg.freeze()
    return cfg


class DemoTraining:
    """The demo's training on the engine's Trainer: SGD with a per-epoch cosine schedule, local
    fine-tuning by a number of batches, evaluation of any model on the test split."""

    def __init__(self, cfg, train_ds, val_ds, progress: bool | None) -> None:
        self.cfg, self.train_ds, self.val_ds, self.progress = cfg, train_ds, val_ds, progress
        self.epochs_seen = 0           # varies the shuffle from one pass to the next

    def _trainer(self, model: torch.nn.Module) -> Trainer:
        trainer = Trainer(self.cfg, model, self.train_ds, self.val_ds, progress=self.progress)
        trainer._wrap()
        return trainer

    def _pass(self, trainer: Trainer, optimizer, desc: str, max_steps: int | None = None) -> dict:
        trainer.state["epochs_seen"] = self.epochs_seen
        self.epochs_seen += 1
        return trainer.train_epoch(optimizer, desc, max_steps)

    def fit(self, model: torch.nn.Module, epochs: int, lr: float, desc: str) -> None:
        trainer = self._trainer(model)
        optimizer = trainer._optimizer(lr)
        for epoch in range(epochs):
            for group in optimizer.param_groups:   # cosine over the epochs
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
            self._pass(trainer, optimizer, f"{desc} {epoch + 1}/{epochs}")

    def local_hook(self, lr: float, steps: int):
        """Algorithm 1, line 12: ``steps`` batches at a constant ``lr`` after each pruning step."""
        def hook(model: torch.nn.Module, t: int) -> None:
            trainer = self._trainer(model)
            self._pass(trainer, trainer._optimizer(lr), f"local t={t}", steps)
        return hook

    def evaluate(self, model: torch.nn.Module) -> dict:
        result = self._trainer(model).evaluate()
        return {"loss": result["loss"], "top1": result["top1"], "top5": result["top5"]}


def results_table(rows: list[dict]) -> str:
    lines = ["| Model | Params | FLOPs | Top-1 (%) | Top-5 (%) | Deployed Top-1 (%) | Epochs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        deployed = "-" if r.get("deployed_top1") is None else f"{r['deployed_top1']:.2f}"
        lines.append(f"| {r['model']} | {format_count(r['params'], 'K')} | {format_count(r['flops'], 'K')} | "
                     f"{r['top1']:.2f} | {r['top5']:.2f} | {deployed} | {r['epochs']} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    parser.add_argument("--data", help="torchvision root with FashionMNIST/raw/, or a folder of idx.gz files")
    parser.add_argument("--download", action="store_true", help="let torchvision download the data")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.80, 0.90, 0.95],
                        help="compression levels (conv = FC ratio) to report")
    parser.add_argument("--step", type=float, default=0.05, help="pruning step s")
    parser.add_argument("--groups", type=int, default=8, help="groups per layer")
    parser.add_argument("--epochs", type=int, default=3, help="baseline training epochs")
    parser.add_argument("--local-steps", type=int, default=60, help="batches of local fine-tuning per step")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="global fine-tuning epochs per level")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05, help="baseline learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="use only the first N training images (smoke runs)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars: log lines per pruning step and every few seconds")


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    for level in args.levels:
        if not 0.0 < level < 1.0:
            raise sgdet.ConfigError(f"compression level must be in (0, 1), got {level}")
        if abs(level / args.step - round(level / args.step)) > 1e-6:
            raise sgdet.ConfigError(f"level {level} is not a multiple of --step {args.step}; "
                                    "each reported level must be a step of the schedule")
    levels = sorted(set(round(level, 6) for level in args.levels))
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, "config.json"), json.dumps(vars(args), indent=2) + "\n")
    # bars on a terminal; elsewhere (`make demo | tee log`) a line per pruning step and every few
    # seconds of training, on stdout beside the results (and in OUT/log.txt)
    terminal = sys.stdout.isatty() and sys.stderr.isatty() and not args.no_progress
    setup_logging(DistContext(), args.out, stream=sys.stdout)
    try:
        return _run(args, levels, started, progress=None if terminal else False,
                    compress_progress=True if terminal else "log")
    finally:
        teardown_logging()


def _run(args: argparse.Namespace, levels: list[float], started: float, progress: bool | None,
         compress_progress: bool | str) -> dict:
    seed_everything(args.seed)
    if args.download:                  # torchvision fetches the files into the cache once
        load_mnist_style("fashion-mnist", args.data, download=True)
    cfg = demo_config(args, find_mnist_root("fashion-mnist", args.data, args.download))
    train_ds, test_ds = build_datasets(cfg)
    training = DemoTraining(cfg, train_ds, test_ds, progress)
    size = (1, 28, 28)
    print(f"Fashion-MNIST: {len(train_ds)} training / {len(test_ds)} test images "
          f"({os.path.abspath(args.out)})")

    baseline = sgdet.models.lenet5(num_classes=10)
    training.fit(baseline, args.epochs, args.lr, desc="baseline")
    base_eval = training.evaluate(baseline)
    base_count = sgdet.count(baseline, size)
    sgdet.save(baseline, os.path.join(args.out, "lenet5_baseline.sg.pt"),
               meta={"eval": base_eval, "counts": base_count})
    rows = [{"model": "LeNet-5 baseline", **base_count, **base_eval, "deployed_top1": None,
             "epochs": str(args.epochs)}]
    print(f"baseline: top-1 {base_eval['top1']:.2f}%  {format_count(base_count['params'], 'K')} params  "
          f"{format_count(base_count['flops'], 'K')} FLOPs")

    # Algorithm 1 with local fine-tuning; snapshot the network when a reported level is reached
    snapshots: dict[float, tuple[torch.nn.Module, int]] = {}
    local = training.local_hook(lr=0.01, steps=args.local_steps)

    def hook(model: torch.nn.Module, t: int) -> None:
        local(model, t)
        reached = round(min(t * args.step, levels[-1]), 6)
        for level in levels:
            if level not in snapshots and reached >= level - 1e-9:
                snapshots[level] = (copy.deepcopy(model), t)

    model = copy.deepcopy(baseline)
    records = sgdet.compress(model, conv_ratio=levels[-1], fc_ratio=levels[-1], groups=args.groups,
                             step=args.step, seed=args.seed, finetune=hook, progress=compress_progress)
    write_text(os.path.join(args.out, "steps.jsonl"),
               "".join(json.dumps(record.to_dict()) + "\n" for record in records))

    for level in levels:
        compressed, steps_done = snapshots[level]
        training.fit(compressed, args.finetune_epochs, 0.01, desc=f"global {level:.2f}")
        masked_eval = training.evaluate(compressed)
        deployed = sgdet.deploy(compressed)
        deployed_eval = training.evaluate(deployed)
        counts = sgdet.count(compressed, size)
        deployed_counts = sgdet.count(deployed, size)
        if deployed_counts["flops"] != counts["flops"] or deployed_counts["params"] > counts["params"]:
            raise RuntimeError(f"deployed count {deployed_counts} disagrees with masked count {counts}")
        tag = f"conv{round(100 * level)}_fc{round(100 * level)}"
        meta = {"level": level, "groups": args.groups, "step": args.step, "eval": masked_eval,
                "counts": counts, "scheme": "LG"}
        sgdet.save(compressed, os.path.join(args.out, f"lenet5_{tag}.sg.pt"), meta=meta)
        sgdet.save(deployed, os.path.join(args.out, f"lenet5_{tag}_deployed.sg.pt"),
                   meta={**meta, "eval": deployed_eval})
        rows.append({"model": f"LeNet-5 (Conv-{round(100 * level)}/FC-{round(100 * level)})",
                     **counts, **masked_eval, "deployed_top1": deployed_eval["top1"],
                     "deployed_top5": deployed_eval["top5"],
                     "epochs": f"{args.epochs}+{steps_done}*{args.local_steps}it+{args.finetune_epochs}"})
        print(f"Conv-{round(100 * level)}/FC-{round(100 * level)}: top-1 {masked_eval['top1']:.2f}% "
              f"(deployed {deployed_eval['top1']:.2f}%)  {format_count(counts['params'], 'K')} params  "
              f"{format_count(counts['flops'], 'K')} FLOPs")

    top = snapshots[levels[-1]][0]
    picture = plot_group_structure(top, os.path.join(args.out, "group_structure.png"),
                                   layers=["features.3", "classifier.1", "classifier.3"],
                                   title=f"LeNet-5 on Fashion-MNIST, Conv-{round(100 * levels[-1])}"
                                         f"/FC-{round(100 * levels[-1])}, g={args.groups}")
    table = results_table(rows)
    elapsed = time.time() - started
    write_text(os.path.join(args.out, "results.md"), table)
    summary = {"rows": rows, "seconds": round(elapsed, 1), "config": vars(args)}
    write_text(os.path.join(args.out, "results.json"), json.dumps(summary, indent=2) + "\n")
    print()
    print(table)
    print(f"results, checkpoints and {os.path.basename(picture)} in {args.out} ({elapsed:.0f} s)")
    return summary
