"""Stage 2 of the detection pipeline: Faster R-CNN training and COCO evaluation on the engine's
one Trainer (``sgdet.engine.Trainer``). Only what detection changes is here, as hooks: the loss
is torchvision's loss dict, batches are lists of images and targets, the learning rate warms up
linearly, evaluation is COCO AP at every INPUT.MIN_SIZE_TEST (Table 6's 300 and 600 px
columns) and the results row is Table 6's. The loop, run state, iteration checkpoints
(SOLVER.CHECKPOINT_PERIOD) and exact resume, DDP, TensorBoard, metrics.jsonl and results.md are
the Trainer's.

Outputs under OUTPUT_DIR: ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``tb/``,
``last_checkpoint.pt``, ``model_final.pth`` (an sgdet checkpoint of the whole detector),
``results.md`` (Table 6 rows) and ``inference/``: ``coco_metrics.json`` and the COCO result
files ``coco_instances_results_<dataset>_<size>.json``."""
from __future__ import annotations

import logging
import math
import os

import torch
from torch.utils.data import DataLoader, Dataset

import sgdet
from sgdet.checkpoint import plain
from sgdet.counting import format_count
from sgdet.engine.distributed import DistContext, all_gather_object, broadcast_object
from sgdet.engine.trainer import Trainer
from sgdet.errors import ConfigError
from sgdet.files import write_json

from .datasets import collate
from .evaluation import METRICS, evaluate_coco, format_table6, predict
from .faster_rcnn import detector_counts

log = logging.getLogger("sgdet.detection")

FINAL = "model_final.pth"
TABLE6_HEADER = "| Model | Params | FLOPs | {sizes} | Epochs |\n|---|---|---|{dashes}---|\n"


def _to_device(targets, device):
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
            for t in targets]


class DetectionTrainer(Trainer):
    """Trainer for a torchvision Faster R-CNN: ``train(resume)`` and ``evaluate_run()``.

    ``test_sets``: {name: COCO-format dataset}; each is evaluated at every INPUT.MIN_SIZE_TEST."""

    final_name = FINAL
    collate = staticmethod(collate)
    nan_advice = "lower SOLVER.BASE_LR or lengthen the warm-up"

    def __init__(self, cfg, model, train_ds: Dataset | None, test_sets: dict[str, Dataset],
                 ctx: DistContext | None = None, weights_meta: dict | None = None,
                 label: str | None = None, progress: bool | None = None) -> None:
        if not test_sets:
            raise ConfigError("DATASETS.TEST names no dataset")
        self.test_sets = dict(test_sets)
        super().__init__(cfg, model, train_ds, next(iter(self.test_sets.values())), ctx,
                         weights_meta, label, progress)
        self.val_loaders: dict[str, DataLoader] = {name: self._val_loader(ds)
                                                   for name, ds in self.test_sets.items()}

    # --------------------------------------------------------------------------- schema hooks
    def hyperparameters(self) -> dict:
        cfg, world = self.cfg, self.ctx.world_size
        total = int(cfg.SOLVER.IMS_PER_BATCH)
        if total % world:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH ({total}) must be divisible by the number of "
                              f"processes ({world})")
        gamma, decay = float(cfg.SOLVER.GAMMA), [int(e) for e in cfg.SOLVER.DECAY_EPOCHS]
        return {"seed": int(cfg.SEED), "amp": bool(cfg.SOLVER.AMP), "channels_last": False,
                "input_size": (3, 224, 224),   # Table 6 counts FLOPs at 224 px (see detector_counts)
                "batch_size": total // world, "test_batch_size": int(cfg.TEST.IMS_PER_BATCH),
                "workers": int(cfg.DATALOADER.NUM_WORKERS), "lr": float(cfg.SOLVER.BASE_LR),
                "momentum": float(cfg.SOLVER.MOMENTUM), "weight_decay": float(cfg.SOLVER.WEIGHT_DECAY),
                "epochs": int(cfg.SOLVER.EPOCHS), "eval_period": int(cfg.TEST.EVAL_PERIOD),
                "checkpoint_period": int(cfg.SOLVER.CHECKPOINT_PERIOD),
                "lr_factor": lambda epoch: gamma ** sum(1 for e in decay if epoch >= e),
                "count_convention": str(cfg.TEST.COUNT_CONVENTION)}

    def default_label(self) -> str:
        return f"Faster R-CNN {self.cfg.MODEL.BACKBONE.NAME}"

    def train_label(self) -> str:
        return self.label

    def _base_epochs(self) -> str | None:
        return None            # Table 6 counts detection epochs only

    def counts(self) -> dict:
        return detector_counts(self.model, self.input_size, self.hp["count_convention"])

    # ------------------------------------------------------------------------------ training
    def losses(self, batch) -> tuple[dict, dict]:
        images, targets = batch
        images = [image.to(self.device, non_blocking=True) for image in images]
        return self.net(images, _to_device(targets, self.device)), {}

    def before_step(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """Linear warm-up over the first SOLVER.WARMUP_ITERS iterations of the run."""
        warmup = int(self.cfg.SOLVER.WARMUP_ITERS)
        if iteration > warmup or self.scheduler is None:
            return
        start = float(self.cfg.SOLVER.WARMUP_FACTOR)
        factor = 1.0 if warmup == 0 else start + (1.0 - start) * iteration / warmup
        for group, base in zip(optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = base * factor

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, desc: str = "eval") -> dict:
        """COCO AP of every test set at every INPUT.MIN_SIZE_TEST: {'datasets': {name: {size:
        metrics}}, 'sizes': {size: metrics of the first test set}}. TEST.DEPLOY evaluates the
        deployed (diverse group convolution) form. Detections are gathered on rank 0, which runs
        pycocotools and writes inference/; every rank gets the metrics."""
        cfg = self.cfg
        model = sgdet.deploy(self.model) if cfg.TEST.DEPLOY else self.model
        transform = model.transform
        saved = (transform.min_size, transform.max_size)
        folder = os.path.join(self.output_dir, "inference")
        progress = None if self.progress_disabled is None else not self.progress_disabled
        results: dict[str, dict[str, dict]] = {}
        try:
            for name, loader in self.val_loaders.items():
                results[name] = {}
                for size in cfg.INPUT.MIN_SIZE_TEST:
                    transform.min_size, transform.max_size = (int(size),), int(cfg.INPUT.MAX_SIZE_TEST)
                    with self._autocast():
                        outputs = predict(model, loader, device=self.device, progress=progress,
                                          desc=f"{desc} {name} @{size}")
                    gathered = all_gather_object(outputs, self.ctx)
                    metrics = None
                    if self.ctx.is_main:
                        merged = {k: v for part in gathered for k, v in part.items()}
                        metrics = evaluate_coco(merged, self.test_sets[name], output_json=os.path.join(
                            folder, f"coco_instances_results_{name}_{size}.json"))
                    metrics = broadcast_object(metrics, self.ctx)
                    results[name][str(size)] = metrics
                    log.info("%s %s @%d px: %s", desc, name, size,
                             "  ".join(f"{k} {metrics[k]:.1f}" for k in METRICS))
        finally:
            transform.min_size, transform.max_size = saved
        first = next(iter(results.values()))
        evaluation = {"datasets": results, "sizes": first, "deployed": bool(cfg.TEST.DEPLOY)}
        if self.ctx.is_main:
            write_json(os.path.join(folder, "coco_metrics.json"), plain(evaluation))
        return evaluation

    # ------------------------------------------------------------------------------ reporting
    def describe_evaluation(self, evaluation: dict) -> tuple[dict, dict, str]:
        sizes = evaluation["sizes"].items()
        scalars = {f"eval@{size}/{k}": v for size, m in sizes for k, v in m.items() if not math.isnan(v)}
        text = "  ".join(f"AP@{size} {m['AP']:.1f} AP50@{size} {m['AP50']:.1f}" for size, m in sizes)
        return {"eval": evaluation["datasets"]}, scalars, text

    def row_metrics(self, evaluation: dict, counts: dict) -> dict:
        return {"total_params": counts["total_params"],
                "ap": {size: m["AP"] for size, m in evaluation["sizes"].items()},
                "ap50": {size: m["AP50"] for size, m in evaluation["sizes"].items()}}

    def results_line(self, row: dict) -> str:
        """A Table 6 row, with one mAP column per test size."""
        sizes = list(row["ap"])
        header = TABLE6_HEADER.format(sizes=" | ".join(f"mAP({s})" for s in sizes),
                                      dashes="---|" * len(sizes))
        cells = " | ".join("-" if math.isnan(v) else f"{v:.1f}" for v in row["ap"].values())
        line = (f"| {row['model']} | {format_count(row['params'])} | {format_count(row['flops'])} | "
                f"{cells} | {row['epochs']} |\n")
        return self.reporter.results_line(line, header)

    def evaluate_run(self) -> dict:
        """``--eval-only``: COCO AP at every INPUT.MIN_SIZE_TEST, Table 6 row, inference/*.json;
        the table is printed too."""
        row = super().evaluate_run()
        evaluation = self.evaluation["datasets"]
        if self.ctx.is_main:
            # one mAP column per INPUT.MIN_SIZE_TEST, not Table 6's fixed 300 / 600
            print(format_table6([row], sizes=list(row["ap"])))
            for name, per_size in evaluation.items():
                for size, metrics in per_size.items():
                    print(f"{name} @{size} px: " + "  ".join(f"{k} {metrics[k]:.1f}" for k in METRICS))
        return row
