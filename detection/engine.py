"""The detection engine: Faster R-CNN training and COCO evaluation on the suite's one Trainer
(classification.engine.Trainer). This module adds only what detection changes: the loss is
torchvision's loss dict, batches are lists of images and targets, evaluation is COCO AP at every
INPUT.MIN_SIZE_TEST (Table 6's 300 and 600 px columns), checkpoints also come every
SOLVER.CHECKPOINT_PERIOD iterations (``--resume`` continues inside an epoch), and the learning
rate warms up linearly. Run state, resume, DDP, TensorBoard, metrics.jsonl and results.md are the
Trainer's.

Outputs under OUTPUT_DIR: ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``tb/``,
``last_checkpoint.pt``, ``model_final.pth`` (an sgdet checkpoint of the whole detector),
``results.md`` (Table 6 rows) and ``inference/``: ``coco_metrics.json`` and the COCO result
files ``coco_instances_results_<dataset>_<size>.json``."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

import sgdet
from classification.distributed import (DistContext, all_gather_object, all_reduce_sum,
                                        broadcast_object)
from classification.engine import (Trainer, _positive_float, _positive_int, sgdet_keep_pruned_zero)
from sgdet.checkpoint import plain
from sgdet.detection import build_faster_rcnn, detector_counts
from sgdet.detection_data import (RandomHorizontalFlip, collate, get_dataset,
                                  register_coco_dataset)
from sgdet.detection_eval import METRICS, evaluate_coco, format_table6, predict
from sgdet.errors import CheckpointError, ConfigError, NumericalError

log = logging.getLogger("detection")

FINAL = "model_final.pth"
TABLE6_HEADER = "| Model | Params | FLOPs | {sizes} | Epochs |\n|---|---|---|{dashes}---|\n"


# ------------------------------------------------------------------------------ config checking

def validate_config(cfg, training: bool = True) -> None:
    """Reject values that cannot run, naming the key (one-line ConfigError)."""
    _positive_int(cfg.SEED, "SEED", 0)
    if str(cfg.MODEL.DEVICE).lower() not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"MODEL.DEVICE must be auto, cpu or cuda, got {cfg.MODEL.DEVICE!r}")
    if not str(cfg.OUTPUT_DIR):
        raise ConfigError("OUTPUT_DIR must be set")
    if cfg.MODEL.BACKBONE.NAME not in sgdet.BACKBONE_REGISTRY:
        names = ", ".join(sorted(name for name, _ in sgdet.BACKBONE_REGISTRY))
        raise ConfigError(f"unknown MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r}; registered: {names}")
    _positive_int(cfg.MODEL.BACKBONE.FREEZE_AT, "MODEL.BACKBONE.FREEZE_AT", 0)
    for key in ("BATCH_SIZE_PER_IMAGE", "PRE_NMS_TOPK_TRAIN", "POST_NMS_TOPK_TRAIN",
                "PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TEST"):
        _positive_int(cfg.MODEL.RPN[key], f"MODEL.RPN.{key}")
    _positive_int(cfg.MODEL.ROI_HEADS.NUM_CLASSES, "MODEL.ROI_HEADS.NUM_CLASSES", 0)
    _positive_int(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    for key in ("SCORE_THRESH_TEST", "NMS_THRESH_TEST"):
        value = _positive_float(cfg.MODEL.ROI_HEADS[key], f"MODEL.ROI_HEADS.{key}", allow_zero=True)
        if value > 1:
            raise ConfigError(f"MODEL.ROI_HEADS.{key} must be in [0, 1], got {value}")
    _positive_int(cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION")
    for entry in cfg.DATASETS.REGISTER:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, str) for v in entry)):
            raise ConfigError(f"DATASETS.REGISTER entries are [name, json_file, image_root], got {entry!r}")
    if training and not list(cfg.DATASETS.TRAIN):
        raise ConfigError("DATASETS.TRAIN is empty; name at least one registered dataset")
    if not list(cfg.DATASETS.TEST):
        raise ConfigError("DATASETS.TEST is empty; name at least one registered dataset")
    for key in ("MIN_SIZE_TRAIN", "MIN_SIZE_TEST"):
        sizes = list(cfg.INPUT[key])
        if not sizes:
            raise ConfigError(f"INPUT.{key} is empty")
        for v in sizes:
            _positive_int(v, f"INPUT.{key} entries", 8)
    _positive_int(cfg.INPUT.MAX_SIZE_TRAIN, "INPUT.MAX_SIZE_TRAIN", 8)
    _positive_int(cfg.INPUT.MAX_SIZE_TEST, "INPUT.MAX_SIZE_TEST", 8)
    _positive_int(cfg.DATALOADER.NUM_WORKERS, "DATALOADER.NUM_WORKERS", 0)
    _positive_int(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    _positive_float(cfg.SOLVER.BASE_LR, "SOLVER.BASE_LR")
    _positive_float(cfg.SOLVER.MOMENTUM, "SOLVER.MOMENTUM", allow_zero=True)
    _positive_float(cfg.SOLVER.WEIGHT_DECAY, "SOLVER.WEIGHT_DECAY", allow_zero=True)
    _positive_int(cfg.SOLVER.EPOCHS, "SOLVER.EPOCHS", 0)
    for e in cfg.SOLVER.DECAY_EPOCHS:
        _positive_int(e, "SOLVER.DECAY_EPOCHS entries")
    _positive_float(cfg.SOLVER.GAMMA, "SOLVER.GAMMA")
    _positive_int(cfg.SOLVER.WARMUP_ITERS, "SOLVER.WARMUP_ITERS", 0)
    factor = _positive_float(cfg.SOLVER.WARMUP_FACTOR, "SOLVER.WARMUP_FACTOR")
    if factor > 1:
        raise ConfigError(f"SOLVER.WARMUP_FACTOR must be in (0, 1], got {factor}")
    _positive_int(cfg.SOLVER.CHECKPOINT_PERIOD, "SOLVER.CHECKPOINT_PERIOD", 0)
    _positive_int(cfg.TEST.EVAL_PERIOD, "TEST.EVAL_PERIOD", 0)
    _positive_int(cfg.TEST.IMS_PER_BATCH, "TEST.IMS_PER_BATCH")
    _positive_int(cfg.TEST.DETECTIONS_PER_IMAGE, "TEST.DETECTIONS_PER_IMAGE")


# ------------------------------------------------------------------------------------ datasets

def register_config_datasets(cfg) -> None:
    """DATASETS.REGISTER entries, relative paths under DATASETS.ROOT (or $SGDET_DATASETS)."""
    from sgdet.detection_data import datasets_root
    base = datasets_root(str(cfg.DATASETS.ROOT) or None)
    for name, json_file, image_root in cfg.DATASETS.REGISTER:
        register_coco_dataset(name, os.path.join(base, json_file), os.path.join(base, image_root),
                              replace=True)


def build_datasets(cfg, training: bool = True) -> tuple[Dataset | None, dict[str, Dataset]]:
    """(training set: every DATASETS.TRAIN name with one label order, or None; {name: test set})."""
    from sgdet.detection_data import ConcatCOCODetection
    register_config_datasets(cfg)
    root = str(cfg.DATASETS.ROOT) or None
    train = None
    category_ids = None
    if training:
        flip = RandomHorizontalFlip(0.5) if cfg.INPUT.RANDOM_FLIP else None
        parts = []
        for name in cfg.DATASETS.TRAIN:
            ds = get_dataset(name, root, transforms=flip, category_ids=category_ids)
            category_ids = ds.category_ids
            parts.extend(ds.datasets if isinstance(ds, ConcatCOCODetection) else [ds])
        train = parts[0] if len(parts) == 1 else ConcatCOCODetection(parts)
    tests = {}
    for name in cfg.DATASETS.TEST:
        tests[name] = get_dataset(name, root, category_ids=category_ids)
        category_ids = category_ids or tests[name].category_ids
    return train, tests


def num_classes_of(cfg, datasets) -> int:
    """Object classes (background excluded): MODEL.ROI_HEADS.NUM_CLASSES, or the data's when 0."""
    found = len(datasets.category_ids)
    wanted = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if wanted and wanted != found:
        raise ConfigError(f"MODEL.ROI_HEADS.NUM_CLASSES is {wanted} but the datasets have {found} "
                          f"categories (set {found}, or 0 to follow the data)")
    return found


# -------------------------------------------------------------------------------------- model

def _is_detector_checkpoint(path: str) -> bool:
    from sgdet.checkpoint import FORMAT
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return (isinstance(blob, dict) and blob.get("format") == FORMAT
            and (blob.get("arch") or {}).get("name") == "faster_rcnn")


def _checkpoint_label(path: str) -> str | None:
    """The results-table name an sgdet checkpoint's meta gives its model, if any."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    meta = blob.get("meta") if isinstance(blob, dict) else None
    return meta.get("label") if isinstance(meta, dict) else None


def detector_label(cfg, meta: dict) -> str:
    """The Table 6 name of a run: the saved detector's, else from the backbone's checkpoint."""
    if meta.get("label"):
        return str(meta["label"])
    name = f"Faster R-CNN {cfg.MODEL.BACKBONE.NAME}"
    return f"{name} ({meta['backbone_label']})" if meta.get("backbone_label") else name


def _apply_inference_settings(model, cfg) -> None:
    """The config's test-time settings on a detector (also one loaded from a checkpoint)."""
    heads = model.roi_heads
    heads.score_thresh = float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    heads.nms_thresh = float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST)
    heads.detections_per_img = int(cfg.TEST.DETECTIONS_PER_IMAGE)


def build_detector(cfg, num_classes: int):
    """(detector, meta): a torchvision FasterRCNN over MODEL.BACKBONE.NAME whose backbone is cut
    from MODEL.WEIGHTS (a compressed classification checkpoint keeps its masks and groups), or
    the detector saved in MODEL.WEIGHTS (``model_final.pth``: evaluation or further training)."""
    path = os.path.expanduser(str(cfg.MODEL.WEIGHTS or ""))
    if path and not os.path.isfile(path):
        raise CheckpointError(f"MODEL.WEIGHTS not found: {path}")
    if path and _is_detector_checkpoint(path):
        model = sgdet.load(path)
        saved = int(model.roi_heads.box_predictor.cls_score.out_features)
        if saved != num_classes + 1:
            raise ConfigError(f"{path} detects {saved - 1} classes but the datasets have {num_classes}")
        meta = dict(getattr(model, "sgdet_meta", None) or {})
        model.transform.min_size = tuple(int(v) for v in cfg.INPUT.MIN_SIZE_TRAIN)
        model.transform.max_size = int(cfg.INPUT.MAX_SIZE_TRAIN)
    else:
        model = build_faster_rcnn(
            cfg.MODEL.BACKBONE.NAME, num_classes + 1, weights=path or None,
            min_size=tuple(int(v) for v in cfg.INPUT.MIN_SIZE_TRAIN),
            max_size=int(cfg.INPUT.MAX_SIZE_TRAIN),
            roi_size=int(cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION),
            backbone_kwargs={"freeze_at": int(cfg.MODEL.BACKBONE.FREEZE_AT),
                             "freeze_bn": bool(cfg.MODEL.BACKBONE.FREEZE_BN)},
            rpn_pre_nms_top_n_train=int(cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN),
            rpn_post_nms_top_n_train=int(cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN),
            rpn_pre_nms_top_n_test=int(cfg.MODEL.RPN.PRE_NMS_TOPK_TEST),
            rpn_post_nms_top_n_test=int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
            rpn_batch_size_per_image=int(cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE),
            box_batch_size_per_image=int(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE))
        meta = {"backbone_label": _checkpoint_label(path)} if path else {}
    _apply_inference_settings(model, cfg)
    if path:
        log.info("loaded weights %s", path)
    return model, meta


# ------------------------------------------------------------------------------------ sampling

class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first ``skip`` samples: a run resumed
    from a checkpoint inside an epoch sees the rest of that epoch's order, not a new one."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def _to_device(targets, device):
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
            for t in targets]


# -------------------------------------------------------------------------------------- trainer

class DetectionTrainer(Trainer):
    """Trainer for a torchvision Faster R-CNN: ``train(resume)`` and ``evaluate_run()``.

    ``test_sets``: {name: COCO-format dataset}; each is evaluated at every INPUT.MIN_SIZE_TEST."""

    final_name = FINAL

    def __init__(self, cfg, model, train_ds: Dataset | None, test_sets: dict[str, Dataset],
                 ctx: DistContext | None = None, weights_meta: dict | None = None,
                 label: str | None = None, progress: bool | None = None) -> None:
        if not test_sets:
            raise ConfigError("DATASETS.TEST names no dataset")
        self.test_sets = dict(test_sets)
        super().__init__(cfg, model, train_ds, next(iter(self.test_sets.values())), ctx,
                         weights_meta, label, progress)
        self.val_loaders = {name: self._val_loader(ds) for name, ds in self.test_sets.items()}

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
                "lr_factor": lambda epoch: gamma ** sum(1 for e in decay if epoch >= e)}

    def default_label(self) -> str:
        name = str(self.cfg.MODEL.BACKBONE.NAME)
        return f"Faster R-CNN {name}"

    def counts(self) -> dict:
        return detector_counts(self.model, self.input_size)

    def _train_loader(self, ds: Dataset) -> DataLoader:
        if len(ds) == 0:
            raise ConfigError("the training set is empty")
        sampler = ResumableSampler(ds, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                   shuffle=True, seed=self.hp["seed"], drop_last=False)
        return DataLoader(ds, batch_size=self.hp["batch_size"], sampler=sampler,
                          num_workers=self.hp["workers"], collate_fn=collate,
                          pin_memory=self.ctx.cuda, drop_last=len(sampler) > self.hp["batch_size"])

    def _val_loader(self, ds: Dataset) -> DataLoader:
        from classification.engine import ShardSampler
        if len(ds) == 0:
            raise ConfigError("a test set is empty")
        return DataLoader(ds, batch_size=self.hp["test_batch_size"],
                          sampler=ShardSampler(len(ds), self.ctx.rank, self.ctx.world_size),
                          num_workers=self.hp["workers"], collate_fn=collate, pin_memory=self.ctx.cuda)

    # ------------------------------------------------------------------------------ training
    def _set_warmup_lr(self, optimizer, iteration: int) -> None:
        """Linear warm-up over the first SOLVER.WARMUP_ITERS iterations of the run."""
        warmup = int(self.cfg.SOLVER.WARMUP_ITERS)
        if iteration > warmup or self.scheduler is None:
            return
        start = float(self.cfg.SOLVER.WARMUP_FACTOR)
        factor = 1.0 if warmup == 0 else start + (1.0 - start) * iteration / warmup
        for group, base in zip(optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = base * factor

    def train_epoch(self, optimizer: torch.optim.Optimizer, desc: str,
                    max_steps: int | None = None) -> dict:
        """One epoch of this rank's shard (from the iteration a resumed checkpoint stopped at),
        with a checkpoint every SOLVER.CHECKPOINT_PERIOD iterations; returns the mean losses."""
        s, loader = self.state, self.train_loader
        loader.sampler.set_epoch(s["epochs_seen"])
        done = int(s.get("iteration") or 0)
        loader.sampler.skip = min(done * self.hp["batch_size"], len(loader.sampler))
        total = done + len(loader)
        sums: dict[str, float] = dict(s.get("partial_losses") or {})
        period = int(self.cfg.SOLVER.CHECKPOINT_PERIOD)
        started = time.time()
        self.net.train()
        bar = tqdm(loader, total=len(loader), desc=desc, leave=False, dynamic_ncols=True,
                   disable=self.progress_disabled)
        for images, targets in bar:
            self._set_warmup_lr(optimizer, int(s.get("iterations_total", 0)))
            images = [image.to(self.device, non_blocking=True) for image in images]
            with self._autocast():
                losses = self.net(images, _to_device(targets, self.device))
            loss = sum(losses.values())
            if not torch.isfinite(loss) and not self.amp:
                raise NumericalError(f"{desc}: the training loss became {float(loss.detach())} at iteration "
                                     f"{done + 1}; lower SOLVER.BASE_LR or lengthen the warm-up")
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            sums["iterations"] = sums.get("iterations", 0.0) + 1
            done += 1
            s["iteration"] = done
            s["iterations_total"] = int(s.get("iterations_total", 0)) + 1
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            if done % 20 == 0 or done == total:
                eta = (time.time() - started) / max(done - (total - len(loader)), 1) * (total - done)
                log.info("%s iter %d/%d  loss %.4f  lr %.2e  eta %s", desc, done, total,
                         sums["loss"] / sums["iterations"], optimizer.param_groups[0]["lr"],
                         time.strftime("%H:%M:%S", time.gmtime(eta)))
            if period and done % period == 0 and done < total:
                s["partial_losses"] = dict(sums)
                self.save_checkpoint(optimizer, self.scheduler)
        bar.close()
        sgdet_keep_pruned_zero(self.model)
        s["iteration"], s["partial_losses"] = 0, None
        keys = sorted(k for k in sums if k != "iterations")
        reduced = all_reduce_sum([sums.get(k, 0.0) for k in keys] + [sums.get("iterations", 0.0)], self.ctx)
        n = max(reduced[-1], 1.0)
        stats = {k: v / n for k, v in zip(keys, reduced[:-1])}
        stats.setdefault("loss", math.nan)
        stats.update(iterations=int(reduced[-1] / self.ctx.world_size), seconds=round(time.time() - started, 2))
        return stats

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
        results: dict[str, dict[str, dict]] = {}
        try:
            for name, loader in self.val_loaders.items():
                results[name] = {}
                for size in cfg.INPUT.MIN_SIZE_TEST:
                    transform.min_size, transform.max_size = (int(size),), int(cfg.INPUT.MAX_SIZE_TEST)
                    with self._autocast():
                        outputs = predict(model, loader, device=self.device,
                                          progress=not self.progress_disabled if self.progress_disabled is not None else None,
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
            _write_json(os.path.join(folder, "coco_metrics.json"), evaluation)
        return evaluation

    # ------------------------------------------------------------------------------ reporting
    def _log_epoch(self, phase: str, stats: dict, lr: float, evaluation: dict | None, **extra) -> None:
        s = self.state
        s["tick"] += 1
        record = {"event": "epoch", "phase": phase, **extra, "lr": lr, **stats}
        if evaluation is not None:
            record["eval"] = evaluation["datasets"]
        self.reporter.metrics(record)
        scalars = {f"{phase}/{k}": v for k, v in stats.items() if k.startswith("loss")}
        scalars[f"{phase}/lr"] = lr
        for size, metrics in ((evaluation or {}).get("sizes") or {}).items():
            scalars.update({f"eval@{size}/{k}": v for k, v in metrics.items() if not math.isnan(v)})
        self.reporter.scalars(s["tick"], scalars)
        where = " ".join(f"{k} {v}" for k, v in extra.items())
        msg = f"{phase} {where}: loss {stats['loss']:.4f}  lr {lr:.2e}  ({stats['iterations']} iterations)"
        if evaluation is not None:
            msg += "  " + "  ".join(f"AP@{size} {m['AP']:.1f} AP50@{size} {m['AP50']:.1f}"
                                    for size, m in evaluation["sizes"].items())
        log.info("%s  (%.1f s)", msg, stats["seconds"])

    def _row(self, evaluation: dict, epochs: str) -> dict:
        counts = self.counts()
        return {"model": self.label, "params": counts["params"],
                "flops": counts["flops"], "total_params": counts["total_params"], "epochs": epochs,
                "ap": {size: m["AP"] for size, m in evaluation["sizes"].items()},
                "ap50": {size: m["AP50"] for size, m in evaluation["sizes"].items()}}

    def _results_line(self, row: dict) -> str:
        sizes = list(row["ap"])
        header = TABLE6_HEADER.format(sizes=" | ".join(f"mAP({s})" for s in sizes),
                                      dashes="---|" * len(sizes))
        from sgdet.counting import format_count
        cells = " | ".join("-" if math.isnan(v) else f"{v:.1f}" for v in row["ap"].values())
        line = (f"| {row['model']} | {format_count(row['params'])} | {format_count(row['flops'])} | "
                f"{cells} | {row['epochs']} |\n")
        return self.reporter.results_line(line, header)

    def _finish(self, row: dict) -> dict:
        s = self.state
        meta = {"label": row["model"], "epochs": row["epochs"], "eval": s["final_eval"],
                "counts": {"params": row["params"], "flops": row["flops"]}, "kind": "detection",
                "config": self.cfg.dump()}
        if self.ctx.is_main:
            sgdet.save(self.model, os.path.join(self.output_dir, self.final_name), meta=meta)
        line = self._results_line(row)
        self.reporter.metrics({"event": "final", **row, "eval": s["final_eval"]["datasets"]})
        s["tick"] += 1
        log.info("result: %s", line.strip())
        s["final"] = row
        s["phase"] = "done"
        self.save_checkpoint()
        self.reporter.close()
        return row

    # ----------------------------------------------------------------------------------- runs
    def train(self, resume: bool = False) -> dict:
        """SOLVER.EPOCHS of SGD (warm-up, decay after SOLVER.DECAY_EPOCHS), evaluation at the end
        (and every TEST.EVAL_PERIOD epochs); writes model_final.pth and a Table 6 row."""
        done = self._train_epochs(resume)
        if done is not None:
            return done
        evaluation = self.state.get("last_eval") or self.evaluate("final eval")
        self.state["final_eval"] = evaluation
        return self._finish(self._row(evaluation, str(self.hp["epochs"])))

    def evaluate_run(self) -> dict:
        """``--eval-only``: COCO AP at every INPUT.MIN_SIZE_TEST, Table 6 row, inference/*.json."""
        evaluation = self.evaluate("eval")
        row = self._row(evaluation, str(self.weights_meta.get("epochs") or "-"))
        row["weights"] = str(self.cfg.MODEL.WEIGHTS)
        line = self._results_line(row)
        self.reporter.metrics({"event": "eval", **row, "eval": evaluation["datasets"]})
        self.reporter.close()
        log.info("result: %s", line.strip())
        if self.ctx.is_main:
            print(format_table6([{"model": row["model"], "params": row["params"], "flops": row["flops"],
                                  "map300": row["ap"].get("300"), "map600": row["ap"].get("600")}]))
            for name, per_size in evaluation["datasets"].items():
                for size, metrics in per_size.items():
                    print(f"{name} @{size} px: " + "  ".join(f"{k} {metrics[k]:.1f}" for k in METRICS))
        return row


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(plain(data), handle, indent=1)
    os.replace(tmp, path)
