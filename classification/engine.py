"""The classification engine: one Trainer for baseline training, self-grouping compression
(Algorithm 1 with the G, LG and L fine-tuning schemes) and evaluation, on one process or many
(torchrun/DDP), with an atomic checkpoint after every epoch and every pruning step that ``--resume``
continues from exactly.

The Trainer is generic: a model, a train and a val Dataset (samples ``(image, label)`` or ``None``
for an unreadable image) and a config in; nothing dataset-specific inside.

Run state machine (what ``last_checkpoint.pt`` records, besides the model and the RNG states)::

    compress:  prune t=1 -> [local epoch 1..L] -> step eval -> prune t=2 ... t=T -> global epoch
               1..E -> final (model_final.sg.pt, results row) -> done
    train:     global epoch 1..E -> final -> done

Outputs under OUTPUT_DIR: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` (one JSON object per
epoch, pruning step and final result), ``tb/`` (TensorBoard scalars), ``results.md`` (one row per
run in the paper's format), ``last_checkpoint.pt`` (resume) and ``model_final.sg.pt``.
"""
from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm.auto import tqdm

import sgdet
from sgdet.checkpoint import FORMAT, VERSION, atomic_torch_save, describe, form_of, plain, read
from sgdet.compress import validate_arguments as validate_sg_arguments
from sgdet.compress import prune_step
from sgdet.counting import format_count
from sgdet.errors import CheckpointError, ConfigError, NumericalError
from sgdet.layers import SGConv2d, SGLinear, is_sg_layer
from sgdet.models import arch_of

from . import datasets as data_module
from .distributed import (DistContext, all_gather_object, all_reduce_min, all_reduce_sum, barrier,
                          broadcast_tensor_, fingerprint)

log = logging.getLogger("classification")

CHECKPOINT = "last_checkpoint.pt"
FINAL = "model_final.sg.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.md"
SCHEMES = ("G", "LG", "L")
RESULTS_HEADER = ("| Model | Params | FLOPs | Top-1 (%) | Top-5 (%) | Epochs |\n"
                  "|---|---|---|---|---|---|\n")


# ------------------------------------------------------------------------------ config checking

def _positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive_float(value, key: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be a {'non-negative' if allow_zero else 'positive'} number, "
                          f"got {value!r}")
    return float(value)


def validate_config(cfg) -> None:
    """Reject a config whose values cannot run, naming the key (a ConfigError, one line)."""
    _positive_int(cfg.SEED, "SEED", 0)
    if str(cfg.DEVICE).lower() not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"DEVICE must be auto, cpu or cuda, got {cfg.DEVICE!r}")
    if not str(cfg.OUTPUT_DIR):
        raise ConfigError("OUTPUT_DIR must be set")
    size = list(cfg.MODEL.INPUT_SIZE)
    if len(size) != 3 or not all(isinstance(v, int) and v >= 1 for v in size):
        raise ConfigError(f"MODEL.INPUT_SIZE must be [C, H, W] positive integers, got {size}")
    _positive_int(cfg.MODEL.NUM_CLASSES, "MODEL.NUM_CLASSES", 0)
    _positive_int(cfg.MODEL.WEIGHTS_EPOCHS, "MODEL.WEIGHTS_EPOCHS", 0)
    if cfg.MODEL.ARCH not in sgdet.ARCHITECTURES:
        raise ConfigError(f"unknown MODEL.ARCH {cfg.MODEL.ARCH!r}; choose from: "
                          f"{', '.join(sorted(sgdet.ARCHITECTURES))}")
    _positive_int(cfg.DATA.BATCH_SIZE, "DATA.BATCH_SIZE")
    _positive_int(cfg.DATA.TEST_BATCH_SIZE, "DATA.TEST_BATCH_SIZE")
    _positive_int(cfg.DATA.WORKERS, "DATA.WORKERS", 0)
    _positive_int(cfg.DATA.LIMIT_TRAIN, "DATA.LIMIT_TRAIN", 0)
    _positive_int(cfg.SOLVER.EPOCHS, "SOLVER.EPOCHS", 0)
    _positive_int(cfg.SOLVER.EVAL_PERIOD, "SOLVER.EVAL_PERIOD", 0)
    _positive_float(cfg.SOLVER.LR, "SOLVER.LR")
    _positive_float(cfg.SOLVER.MOMENTUM, "SOLVER.MOMENTUM", allow_zero=True)
    _positive_float(cfg.SOLVER.WEIGHT_DECAY, "SOLVER.WEIGHT_DECAY", allow_zero=True)
    _positive_float(cfg.SOLVER.GAMMA, "SOLVER.GAMMA")
    if cfg.SOLVER.SCHEDULE not in ("multistep", "cosine", "constant"):
        raise ConfigError(f"SOLVER.SCHEDULE must be multistep, cosine or constant, got {cfg.SOLVER.SCHEDULE!r}")
    for m in cfg.SOLVER.MILESTONES:
        _positive_int(m, "SOLVER.MILESTONES entries")
    if str(cfg.SG.SCHEME).upper() not in SCHEMES:
        raise ConfigError(f"SG.SCHEME must be one of {', '.join(SCHEMES)}, got {cfg.SG.SCHEME!r}")
    validate_sg_arguments(cfg.SG.CONV_RATIO, cfg.SG.FC_RATIO, cfg.SG.GROUPS, cfg.SG.STEP, cfg.SEED,
                          cfg.SG.N_INIT)
    _positive_int(cfg.SG.LOCAL_EPOCHS, "SG.LOCAL_EPOCHS", 0)
    _positive_float(cfg.SG.LOCAL_LR, "SG.LOCAL_LR")


# ------------------------------------------------------------------------------ seeds and RNGs

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Every RNG this process draws from, as plain values and tensors (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------- models

_PRETTY = (("resnet", "ResNet"), ("densenet", "DenseNet"), ("vgg", "VGG"), ("lenet", "LeNet-"),
           ("alexnet", "AlexNet"))


def pretty_arch(arch: str) -> str:
    """resnet50 -> ResNet50, densenet121_cifar -> DenseNet121, lenet5 -> LeNet-5."""
    base = arch.split("_")[0]
    for prefix, name in _PRETTY:
        if base.startswith(prefix):
            return name + base[len(prefix):]
    return arch


def build_model(cfg, num_classes: int) -> tuple[nn.Module, dict]:
    """The registered MODEL.ARCH with ``num_classes`` outputs (and INPUT_SIZE[0] input channels if
    the builder takes ``in_channels``), with MODEL.WEIGHTS loaded: a dense state dict (``.pth``)
    or an sgdet checkpoint (dense or masked). Returns the model and the checkpoint's meta."""
    builder = sgdet.ARCHITECTURES.get(cfg.MODEL.ARCH)
    if builder is None:
        raise ConfigError(f"unknown MODEL.ARCH {cfg.MODEL.ARCH!r}; choose from: "
                          f"{', '.join(sorted(sgdet.ARCHITECTURES))}")
    kwargs: dict[str, Any] = {"num_classes": int(num_classes)}
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        params = {}
    if "in_channels" in params:
        kwargs["in_channels"] = int(cfg.MODEL.INPUT_SIZE[0])
    model = sgdet.build(cfg.MODEL.ARCH, **kwargs)
    meta: dict = {}
    path = str(cfg.MODEL.WEIGHTS or "")
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"MODEL.WEIGHTS not found: {path}")
        if _is_sgdet_checkpoint(path):
            model = sgdet.load(path, model=model)
            meta = dict(getattr(model, "sgdet_meta", None) or {})
        else:
            sgdet.load_dense_weights(model, path)
        log.info("loaded weights %s", path)
    return model, meta


def _is_sgdet_checkpoint(path: str) -> bool:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False      # load_dense_weights reports the file properly
    return isinstance(blob, dict) and blob.get("format") == FORMAT


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------------------------- schedules

def n_prune_steps(conv_ratio: float, fc_ratio: float, step: float | None) -> tuple[int, float]:
    """Number of pruning steps T of the schedule and the effective step (as sgdet.compress)."""
    goal = max(conv_ratio, fc_ratio)
    step = goal if step is None or step >= goal else step
    n = max(1, math.ceil(goal / step - 1e-9)) if goal > 0 else 1
    return n, step


def lr_factor_fn(cfg):
    """Multiplier of SOLVER.LR at a (0-based) epoch of global training."""
    kind, epochs = cfg.SOLVER.SCHEDULE, max(int(cfg.SOLVER.EPOCHS), 1)
    milestones, gamma = [int(m) for m in cfg.SOLVER.MILESTONES], float(cfg.SOLVER.GAMMA)

    def factor(epoch: int) -> float:
        if kind == "multistep":
            return gamma ** sum(1 for m in milestones if epoch >= m)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))
        return 1.0
    return factor


def epochs_string(base: str | None, steps: int = 0, local: int = 0, global_: int | None = None) -> str:
    """The paper's Epochs column: ``90`` (baseline), ``90+90`` (G), ``90+6*20+90`` (LG),
    ``90+6*20`` (L)."""
    parts = [] if base is None else [str(base)]
    if steps and local:
        parts.append(f"{steps}*{local}")
    if global_:
        parts.append(str(global_))
    return "+".join(parts) if parts else "0"


# ------------------------------------------------------------------------------------ samplers

class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of a dataset: an exact partition for evaluation (unlike
    DistributedSampler, nothing is padded or repeated)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _base_dataset(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


# ------------------------------------------------------------------------------------ reporting

class Reporter:
    """Rank 0's outputs: metrics.jsonl, TensorBoard scalars, results.md. Every other rank gets a
    disabled Reporter that writes nothing."""

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self._writer = None
        self._purge_step: int | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def offsets(self) -> dict:
        return {name: (os.path.getsize(self.path(name)) if os.path.exists(self.path(name)) else 0)
                for name in (METRICS, RESULTS)}

    def rewind(self, offsets: dict, tick: int) -> None:
        """Drop what was written after the checkpoint being resumed (it will be written again)."""
        if not self.enabled:
            return
        for name, size in (offsets or {}).items():
            p = self.path(name)
            if os.path.exists(p) and os.path.getsize(p) > size:
                with open(p, "r+b") as handle:
                    handle.truncate(size)
        self._purge_step = tick

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.path(METRICS), "a") as handle:
            handle.write(json.dumps(plain(record), sort_keys=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def scalars(self, tick: int, values: dict) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=self.path("tb"), purge_step=self._purge_step)
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), tick)
        self._writer.flush()

    def results_row(self, row: dict) -> str:
        line = (f"| {row['model']} | {format_count(row['params'])} | {format_count(row['flops'])} | "
                f"{row['top1']:.2f} | {row['top5']:.2f} | {row['epochs']} |\n")
        return self.results_line(line, RESULTS_HEADER)

    def results_line(self, line: str, header: str) -> str:
        """Append ``line`` to results.md (``header`` first when the file is new)."""
        if self.enabled:
            new = not os.path.exists(self.path(RESULTS)) or os.path.getsize(self.path(RESULTS)) == 0
            with open(self.path(RESULTS), "a") as handle:
                handle.write((header if new else "") + line)
                handle.flush()
                os.fsync(handle.fileno())
        return line

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# -------------------------------------------------------------------------------------- trainer

_RAW_STATE = ("optimizer", "scheduler", "scaler", "rng")


def _fresh_state(kind: str) -> dict:
    return {"kind": kind, "phase": "prune" if kind == "compress" else "global",
            "t": 0, "local_done": 0, "step_done": True, "epoch": 0, "epochs_seen": 0, "tick": 0,
            "steps": [], "base": None, "final": None, "last_eval": None,
            "optimizer": None, "scheduler": None, "scaler": None}


class Trainer:
    """Train, compress or evaluate ``model`` on ``train_ds``/``val_ds`` as ``cfg`` says.

    ``weights_meta``: the meta of the checkpoint the weights came from (its ``epochs`` fill the
    Epochs column). ``label``: the model's name in the results table (default from MODEL.ARCH).
    Call ``train()``, ``compress()`` or ``evaluate_run()``; each returns the result row.

    Other pipelines subclass it (detection: losses, COCO AP, detectron2-style keys) and keep its
    run state machine, checkpoints, resume, DDP, logging and reporting."""

    final_name = FINAL
    scheduler = None        # the global phase's LR scheduler, once it runs

    def __init__(self, cfg, model: nn.Module, train_ds: Dataset | None, val_ds: Dataset,
                 ctx: DistContext | None = None, weights_meta: dict | None = None,
                 label: str | None = None, progress: bool | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or DistContext()
        self.device = self.ctx.device
        self.output_dir = str(cfg.OUTPUT_DIR)
        self.model = model
        self.net: nn.Module = model            # the DDP wrapper while training distributed
        self.weights_meta = dict(weights_meta or {})
        self.hp = self.hyperparameters()
        self.label = label or self.default_label()
        self.amp = self.ctx.cuda and bool(self.hp["amp"])
        self.channels_last = self.ctx.cuda and bool(self.hp["channels_last"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.progress_disabled = (not self.ctx.is_main) if progress is None else not progress
        if progress is None and self.ctx.is_main:
            self.progress_disabled = None          # tqdm: on for a terminal, off in a log file
        self.reporter = Reporter(self.output_dir, self.ctx.is_main)
        self.input_size = self.hp["input_size"]
        self.min_batch = 2 if has_batchnorm(model) else 1
        self.state = _fresh_state("train")
        self.train_loader = self._train_loader(train_ds) if train_ds is not None else None
        self.val_loader = self._val_loader(val_ds)
        self.may_skip = any(isinstance(_base_dataset(ds), data_module.SkippingImageFolder)
                            for ds in (train_ds, val_ds) if ds is not None)
        self._place()
        if self.ctx.cuda:
            torch.backends.cudnn.benchmark = True

    # ---------------------------------------------------------------------------- plumbing
    def _place(self) -> None:
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _wrap(self) -> None:
        """DDP over the model (after any change of its modules). Buffers (BN statistics and the
        SG layers' group/mask) are broadcast from rank 0 at each forward (identical anyway)."""
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.ctx.cuda else None
            self.net = DDP(self.model, device_ids=ids)   # buffers: synced from rank 0
        else:
            self.net = self.model

    def _train_loader(self, ds: Dataset) -> DataLoader:
        if len(ds) == 0:
            raise ConfigError("the training set is empty")
        hp, ctx = self.hp, self.ctx
        sampler = DistributedSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=hp["seed"], drop_last=False)
        batch = hp["batch_size"]
        return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=hp["workers"],
                          collate_fn=data_module.collate_skipping_bad, pin_memory=ctx.cuda,
                          drop_last=len(sampler) > batch)

    def _val_loader(self, ds: Dataset) -> DataLoader:
        if len(ds) == 0:
            raise ConfigError("the validation set is empty")
        sampler = ShardSampler(len(ds), self.ctx.rank, self.ctx.world_size)
        return DataLoader(ds, batch_size=self.hp["test_batch_size"], sampler=sampler,
                          num_workers=self.hp["workers"],
                          collate_fn=data_module.collate_skipping_bad, pin_memory=self.ctx.cuda)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp) if self.ctx.cuda \
            else torch.autocast("cpu", enabled=False)

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def sg_layers(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.model.named_modules() if is_sg_layer(m)}

    def counts(self) -> dict:
        return sgdet.count(self.model, self.input_size)

    # ------------------------------------------------------------- the config schema's hooks
    def hyperparameters(self) -> dict:
        """What the generic loop reads from the config, by name; a pipeline with another schema
        (detection's detectron2-style keys) overrides this and nothing else of the plumbing."""
        cfg = self.cfg
        return {"seed": int(cfg.SEED), "amp": bool(cfg.AMP), "channels_last": bool(cfg.CHANNELS_LAST),
                "input_size": tuple(int(v) for v in cfg.MODEL.INPUT_SIZE),
                "batch_size": int(cfg.DATA.BATCH_SIZE), "test_batch_size": int(cfg.DATA.TEST_BATCH_SIZE),
                "workers": int(cfg.DATA.WORKERS), "lr": float(cfg.SOLVER.LR),
                "momentum": float(cfg.SOLVER.MOMENTUM), "weight_decay": float(cfg.SOLVER.WEIGHT_DECAY),
                "epochs": int(cfg.SOLVER.EPOCHS), "eval_period": int(cfg.SOLVER.EVAL_PERIOD),
                "lr_factor": lr_factor_fn(cfg)}

    def default_label(self) -> str:
        return pretty_arch(self.cfg.MODEL.ARCH)

    # ------------------------------------------------------------------------- one epoch
    def train_epoch(self, optimizer: torch.optim.Optimizer, desc: str,
                    max_steps: int | None = None) -> dict:
        """One pass over the training set (this rank's shard), or its first ``max_steps``
        batches (local fine-tuning by iterations); returns loss, top-1, skipped."""
        loader = self.train_loader
        loader.sampler.set_epoch(self.state["epochs_seen"])
        self.net.train()
        started = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = skipped = small = 0
        batches = loader if max_steps is None else itertools.islice(loader, max_steps)
        total = len(loader) if max_steps is None else min(len(loader), max_steps)
        bar = tqdm(batches, total=total, desc=desc, leave=False, disable=self.progress_disabled,
                   dynamic_ncols=True)
        for i, (images, labels, n_skipped) in enumerate(bar):
            skipped += n_skipped
            n = labels.numel()
            if self.may_skip and self.ctx.distributed:
                n = all_reduce_min(n, self.ctx)     # every rank steps or none does
            if n < self.min_batch:
                small += 1
                continue
            images, labels = self._inputs(images, labels)
            with self._autocast():
                logits = self.net(images)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            loss_sum += loss.detach().double() * labels.numel()
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.numel()
            if i % 20 == 0 or not self.ctx.cuda:
                value = loss_sum.item() / max(seen, 1)
                if not math.isfinite(value) and not self.amp:
                    raise NumericalError(f"{desc}: the training loss became {value}; "
                                         "lower the learning rate")
                bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        sgdet_keep_pruned_zero(self.model)
        total_loss, total_correct, total_seen, total_skipped, total_small = all_reduce_sum(
            [loss_sum.item(), correct.item(), seen, skipped, small], self.ctx)
        if total_skipped:
            log.warning("%s: skipped %d unreadable training image(s)", desc, int(total_skipped))
        if total_small:
            log.info("%s: skipped %d batch(es) left with fewer than %d readable image(s)",
                     desc, int(total_small), self.min_batch)
        return {"loss": total_loss / max(total_seen, 1), "train_top1": 100 * total_correct / max(total_seen, 1),
                "skipped": int(total_skipped), "seconds": round(time.time() - started, 2)}

    @torch.no_grad()
    def evaluate(self, desc: str = "eval") -> dict:
        """Top-1/top-5 (%) and mean loss over the whole validation set (all ranks together)."""
        model = self.model
        model.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        for images, labels, n_skipped in tqdm(self.val_loader, desc=desc, leave=False,
                                              disable=self.progress_disabled, dynamic_ncols=True):
            sums[4] += n_skipped
            if labels.numel() == 0:
                continue
            images, labels = self._inputs(images, labels)
            with self._autocast():
                logits = model(images)
            logits = logits.float()
            best = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").item()
            sums[1] += int((best[:, 0] == labels).sum())
            sums[2] += int((best == labels.unsqueeze(1)).any(1).sum())
            sums[3] += labels.numel()
        loss, top1, top5, seen, skipped = all_reduce_sum(sums.tolist(), self.ctx)
        if skipped:
            log.warning("%s: skipped %d unreadable validation image(s)", desc, int(skipped))
        if seen == 0:
            raise ConfigError("no readable validation image")
        return {"loss": loss / seen, "top1": 100 * top1 / seen, "top5": 100 * top5 / seen,
                "images": int(seen), "skipped": int(skipped)}

    # ------------------------------------------------------------------------- checkpoints
    def checkpoint_path(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT)

    def save_checkpoint(self, optimizer=None, scheduler=None) -> None:
        """Atomic ``last_checkpoint.pt``: an sgdet checkpoint (sgdet.load reads it) whose
        ``train_state`` holds the run state, optimizer, scheduler, AMP scaler and every rank's RNG
        states. Collective: every rank must call it."""
        rngs = all_gather_object(rng_state(self.device), self.ctx)
        if self.ctx.is_main:
            state = {k: v for k, v in self.state.items() if k not in _RAW_STATE}
            state.update(world_size=self.ctx.world_size, offsets=self.reporter.offsets(),
                         config=self.cfg.dump())
            state = plain(state, "train_state")
            # optimiser state keeps its integer keys (plain() would make them strings)
            state["optimizer"] = optimizer.state_dict() if optimizer is not None else None
            state["scheduler"] = plain(scheduler.state_dict()) if scheduler is not None else None
            state["scaler"] = self.scaler.state_dict() if self.amp else None
            state["rng"] = rngs
            payload = {
                "format": FORMAT, "version": VERSION, "arch": arch_of(self.model),
                "form": form_of(self.model), "modules": describe(self.model),
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "meta": plain({"label": self.label, "kind": state["kind"], "phase": state["phase"],
                               "t": state["t"], "epoch": state["epoch"]}),
                "train_state": state,
            }
            atomic_torch_save(payload, self.checkpoint_path())
        barrier(self.ctx)

    def load_checkpoint(self, kind: str) -> bool:
        """Restore model, masks and run state from ``last_checkpoint.pt``; False if there is none."""
        path = self.checkpoint_path()
        if not os.path.isfile(path):
            log.info("no checkpoint in %s; starting from the beginning", self.output_dir)
            return False
        payload = read(path)
        state = payload.get("train_state")
        if not isinstance(state, dict) or "phase" not in state:
            raise CheckpointError(f"{path} holds no training state; cannot resume from it")
        if state.get("kind") != kind:
            raise ConfigError(f"{path} is from a '{state.get('kind')}' run; cannot resume it as '{kind}'")
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        sgdet.load(path, model=self.model, map_location=self.device)
        for name, param in self.model.named_parameters():   # loading may rebuild layers: keep
            if name in frozen:                               # the frozen stages frozen
                param.requires_grad_(False)
        self._place()
        self.state = state
        log.info("resuming from %s (%s)", path, self._where())
        return True

    def _restore_rng(self) -> None:
        rngs = self.state.get("rng") or []
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank], self.device)
        else:
            log.warning("checkpoint was written by %d process(es), this run has %d: RNG streams "
                        "restart from SEED (data order stays exact)", len(rngs), self.ctx.world_size)
            seed_everything(self.hp["seed"] + 1000 * int(self.state["epochs_seen"]) + self.ctx.rank)

    def _where(self) -> str:
        s = self.state
        if s["phase"] == "prune":
            return f"pruning step {s['t']}, {s['local_done']} local epoch(s) done"
        if s["phase"] == "global":
            return f"{s['epoch']} global epoch(s) done"
        return s["phase"]

    def _start(self, kind: str, resume: bool) -> bool:
        """Fresh state (seeded) or the checkpoint's; True when resumed."""
        resumed = resume and self.load_checkpoint(kind)
        if self.ctx.is_main and os.path.isdir(self.output_dir):
            for name in os.listdir(self.output_dir):      # half-written files of a killed run
                if name.startswith(".tmp-") and name.endswith(".pt"):
                    os.unlink(os.path.join(self.output_dir, name))
        if resumed:
            if self.state.get("config") not in (None, self.cfg.dump()):
                log.warning("the config differs from the one the checkpoint was written with; "
                            "continuing with the new one")
            self.reporter.rewind(self.state.get("offsets"), int(self.state["tick"]))
            self._restore_rng()
        else:
            if not resume and os.path.isfile(self.checkpoint_path()):
                log.info("starting afresh over %s (pass --resume to continue it)", self.checkpoint_path())
            self.state = _fresh_state(kind)
            seed_everything(self.hp["seed"] + self.ctx.rank)
            # before anything is written: a run killed from here on resumes and rewinds the
            # metrics and results files to this point
            self.save_checkpoint()
        return resumed

    # --------------------------------------------------------------------------- optimisers
    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]   # frozen stages stay out
        return torch.optim.SGD(params, lr=lr, momentum=self.hp["momentum"],
                               weight_decay=self.hp["weight_decay"])

    def _load_optimizer(self, optimizer, scheduler=None) -> None:
        if self.state.get("optimizer") is not None:
            optimizer.load_state_dict(self.state["optimizer"])
        if scheduler is not None and self.state.get("scheduler") is not None:
            scheduler.load_state_dict(self.state["scheduler"])
        if self.amp and self.state.get("scaler"):
            self.scaler.load_state_dict(self.state["scaler"])

    def _log_epoch(self, phase: str, stats: dict, lr: float, evaluation: dict | None, **extra) -> None:
        s = self.state
        s["tick"] += 1
        record = {"event": "epoch", "phase": phase, **extra, "lr": lr, **stats}
        if evaluation is not None:
            record.update({f"val_{k}": v for k, v in evaluation.items()})
        self.reporter.metrics(record)
        self.reporter.scalars(s["tick"], {f"{phase}/loss": stats["loss"], f"{phase}/train_top1": stats["train_top1"],
                                          f"{phase}/lr": lr,
                                          f"{phase}/val_top1": (evaluation or {}).get("top1"),
                                          f"{phase}/val_top5": (evaluation or {}).get("top5")})
        where = " ".join(f"{k} {v}" for k, v in extra.items())
        msg = f"{phase} {where}: loss {stats['loss']:.4f}  train top-1 {stats['train_top1']:.2f}%  lr {lr:.2e}"
        if evaluation is not None:
            msg += f"  val top-1 {evaluation['top1']:.2f}%  top-5 {evaluation['top5']:.2f}%"
        log.info("%s  (%.1f s)", msg, stats["seconds"])

    # ------------------------------------------------------------------------------ phases
    def _global_phase(self, epochs: int) -> None:
        """SOLVER.EPOCHS of SGD with the SOLVER schedule (baseline training or global
        fine-tuning), a checkpoint after each epoch."""
        s = self.state
        optimizer = self._optimizer(self.hp["lr"])
        factor = self.hp["lr_factor"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: factor(e))
        self.scheduler = scheduler          # periodic checkpoints inside an epoch save it too
        if s["epoch"] > 0 or s.get("iteration"):
            self._load_optimizer(optimizer, scheduler)
        period = self.hp["eval_period"]
        while s["epoch"] < epochs:
            lr = optimizer.param_groups[0]["lr"]
            stats = self.train_epoch(optimizer, f"{'train' if s['kind'] == 'train' else 'global'} "
                                                f"{s['epoch'] + 1}/{epochs}")
            scheduler.step()
            s["epoch"] += 1
            s["epochs_seen"] += 1
            evaluation = None
            if period and (s["epoch"] % period == 0 or s["epoch"] == epochs):
                evaluation = self.evaluate(f"eval {s['epoch']}/{epochs}")
            s["last_eval"] = evaluation
            self._log_epoch("train" if s["kind"] == "train" else "global", stats, lr, evaluation,
                            epoch=s["epoch"], of=epochs)
            self.save_checkpoint(optimizer, scheduler)
        s["phase"] = "final"

    def _prune_phase(self, layers: dict, steps: int, step: float, local_epochs: int) -> None:
        """Algorithm 1: T pruning steps, each followed by ``local_epochs`` epochs at SG.LOCAL_LR,
        with a checkpoint after each pruning step and each local epoch."""
        cfg, s = self.cfg, self.state
        conv_ratio, fc_ratio = float(cfg.SG.CONV_RATIO), float(cfg.SG.FC_RATIO)
        groups, seed, n_init = int(cfg.SG.GROUPS), int(cfg.SEED), int(cfg.SG.N_INIT)
        warned: set[str] = set()
        while True:
            if s["step_done"]:
                if s["t"] >= steps:
                    break
                t = s["t"] + 1
                conv_target = min(round(t * step, 10), conv_ratio)
                fc_target = min(round(t * step, 10), fc_ratio)
                started = time.time()
                summary = prune_step(layers, conv_target, fc_target, groups, seed, n_init, warned)
                sync_structure(layers, self.ctx, t)
                record = sgdet.StepRecord(step=t, conv_target=conv_target, fc_target=fc_target,
                                          conv_pruned=_fraction(m for m in layers.values() if isinstance(m, SGConv2d)),
                                          fc_pruned=_fraction(m for m in layers.values() if isinstance(m, SGLinear)),
                                          network_pruned=_fraction(layers.values()),
                                          layers={k: {"groups": v["groups"], "pruned": v["pruned"]}
                                                  for k, v in summary.items()})
                s.update(t=t, local_done=0, step_done=False, optimizer=None, pending=record.to_dict())
                log.info("pruning step %d/%d: conv %.1f%% (target %.1f%%), FC %.1f%% (target %.1f%%), "
                         "network %.1f%%  (%.1f s)", t, steps, 100 * record.conv_pruned, 100 * conv_target,
                         100 * record.fc_pruned, 100 * fc_target, 100 * record.network_pruned,
                         time.time() - started)
                self.save_checkpoint()
            t = s["t"]
            optimizer = None
            if s["local_done"] < local_epochs:
                optimizer = self._optimizer(float(cfg.SG.LOCAL_LR))
                if s["local_done"] > 0:
                    self._load_optimizer(optimizer)
            while s["local_done"] < local_epochs:
                stats = self.train_epoch(optimizer, f"local t={t} {s['local_done'] + 1}/{local_epochs}")
                s["local_done"] += 1
                s["epochs_seen"] += 1
                self._log_epoch("local", stats, float(cfg.SG.LOCAL_LR), None, t=t,
                                epoch=s["local_done"], of=local_epochs)
                self.save_checkpoint(optimizer)
            # the step is finished: evaluate and record it
            record = dict(s.pop("pending", None) or {"step": t})
            evaluation = self.evaluate(f"eval t={t}") if cfg.SG.EVAL_EACH_STEP else None
            counts = self.counts()
            entry = {k: v for k, v in record.items() if k != "layers"}
            entry.update(counts)
            if evaluation is not None:
                entry.update(top1=evaluation["top1"], top5=evaluation["top5"], loss=evaluation["loss"])
            s["steps"].append(entry)
            s["last_eval"] = evaluation
            s["tick"] += 1
            self.reporter.metrics({"event": "step", **entry, "layers": record.get("layers", {})})
            self.reporter.scalars(s["tick"], {"prune/network_pruned": 100 * entry.get("network_pruned", 0),
                                              "prune/params": counts.get("params"),
                                              "prune/flops": counts.get("flops"),
                                              "prune/val_top1": entry.get("top1"),
                                              "prune/val_top5": entry.get("top5")})
            if evaluation is not None:
                log.info("after step %d: val top-1 %.2f%%  top-5 %.2f%%", t, evaluation["top1"],
                         evaluation["top5"])
            s["step_done"] = True
            self.save_checkpoint()

    # --------------------------------------------------------------------------------- runs
    def _finish(self, row: dict) -> dict:
        """Write model_final.sg.pt, the results row and the final metrics; mark the run done."""
        s = self.state
        meta = {"label": row["model"], "epochs": row["epochs"], "eval": s["final_eval"],
                "counts": {"params": row["params"], "flops": row["flops"]}, "kind": s["kind"],
                "config": self.cfg.dump(), "steps": s["steps"], "base": s["base"]}
        if s["kind"] == "compress":
            meta.update(scheme=str(self.cfg.SG.SCHEME).upper(), conv_ratio=float(self.cfg.SG.CONV_RATIO),
                        fc_ratio=float(self.cfg.SG.FC_RATIO), groups=int(self.cfg.SG.GROUPS),
                        step=float(self.cfg.SG.STEP))
        if self.ctx.is_main:
            sgdet.save(self.model, os.path.join(self.output_dir, self.final_name), meta=meta)
        line = self.reporter.results_row(row)
        self.reporter.metrics({"event": "final", **row, "eval": s["final_eval"]})
        s["tick"] += 1
        self.reporter.scalars(s["tick"], {"final/top1": row["top1"], "final/top5": row["top5"],
                                          "final/params": row["params"], "final/flops": row["flops"]})
        log.info("result: %s", line.strip())
        s["final"] = row
        s["phase"] = "done"
        self.save_checkpoint()
        self.reporter.close()
        return row

    def _final_row(self, label: str, epochs: str) -> dict:
        s = self.state
        evaluation = s.get("last_eval") or self.evaluate("final eval")
        s["final_eval"] = evaluation
        counts = self.counts()
        row = {"model": label, "params": counts["params"], "flops": counts["flops"],
               "top1": evaluation["top1"], "top5": evaluation["top5"], "epochs": epochs}
        if s["kind"] == "compress" and s["steps"]:
            last = s["steps"][-1]
            row.update(conv_pruned=last["conv_pruned"], fc_pruned=last["fc_pruned"],
                       network_pruned=last["network_pruned"])
        if s.get("base"):
            base = s["base"]
            row.update(params_pruned=1 - counts["params"] / base["params"],
                       flops_pruned=1 - counts["flops"] / base["flops"])
        return row

    def _already_done(self) -> dict | None:
        if self.state.get("phase") == "done" and self.state.get("final"):
            log.info("this run already finished; nothing to do (%s)", self.state["final"]["model"])
            self.reporter.close()
            return self.state["final"]
        return None

    def _base_epochs(self) -> str | None:
        if int(self.cfg.MODEL.WEIGHTS_EPOCHS) > 0:
            return str(int(self.cfg.MODEL.WEIGHTS_EPOCHS))
        if self.weights_meta.get("epochs"):
            return str(self.weights_meta["epochs"])
        return "?" if self.cfg.MODEL.WEIGHTS else None

    def _train_epochs(self, resume: bool) -> dict | None:
        """Start (or resume) a training run and run its epochs; the stored result row when the
        run had already finished, else None (the caller writes the final outputs)."""
        self._start("train", resume)
        done = self._already_done()
        if done is not None:
            return done
        if self.train_loader is None:
            raise ConfigError("training needs a training set")
        self._wrap()
        if self.state["phase"] == "global":
            self._global_phase(self.hp["epochs"])
        return None

    def train(self, resume: bool = False) -> dict:
        """Baseline training (or plain fine-tuning of MODEL.WEIGHTS): SOLVER.EPOCHS with the
        SOLVER schedule; writes model_final.sg.pt and a results row."""
        done = self._train_epochs(resume)
        if done is not None:
            return done
        epochs = self.hp["epochs"]
        base = self._base_epochs()
        label = f"{self.label} baseline"
        return self._finish(self._final_row(label, epochs_string(base, global_=epochs)))

    def compress(self, resume: bool = False) -> dict:
        """Algorithm 1 on the loaded weights with the SG.SCHEME fine-tuning (G: global only, LG:
        local after every step + global, L: local only); writes model_final.sg.pt."""
        cfg = self.cfg
        scheme = str(cfg.SG.SCHEME).upper()
        local = scheme in ("LG", "L")
        global_ = scheme in ("G", "LG")
        steps, step = n_prune_steps(float(cfg.SG.CONV_RATIO), float(cfg.SG.FC_RATIO), float(cfg.SG.STEP))
        local_epochs = int(cfg.SG.LOCAL_EPOCHS) if local else 0
        global_epochs = self.hp["epochs"] if global_ else 0
        if (local_epochs or global_epochs) and self.train_loader is None:
            raise ConfigError(f"scheme {scheme} fine-tunes and needs a training set")
        resumed = self._start("compress", resume)
        done = self._already_done()
        if done is not None:
            return done
        if not cfg.MODEL.WEIGHTS and not resumed:
            log.warning("MODEL.WEIGHTS is empty: compressing a randomly initialised %s", cfg.MODEL.ARCH)
        if self.state["base"] is None:       # the dense network, before anything is pruned
            base = dict(self.counts())
            if cfg.SG.EVAL_EACH_STEP:
                evaluation = self.evaluate("eval baseline")
                base.update(top1=evaluation["top1"], top5=evaluation["top5"], loss=evaluation["loss"])
                log.info("before pruning: val top-1 %.2f%%  top-5 %.2f%%", evaluation["top1"], evaluation["top5"])
            self.state["base"] = base
            self.reporter.metrics({"event": "baseline", **base})
        layers = sgdet.convert(self.model, list(cfg.SG.INCLUDE), list(cfg.SG.EXCLUDE))
        if not layers:
            raise ConfigError("the model has no compressible Conv2d/Linear layers")
        self._place()
        self._wrap()
        log.info("self-grouping %s: scheme %s, Conv-%g/FC-%g, g=%d, step %g -> %d step(s), %d SG layers",
                 cfg.MODEL.ARCH, scheme, round(100 * float(cfg.SG.CONV_RATIO), 4),
                 round(100 * float(cfg.SG.FC_RATIO), 4), int(cfg.SG.GROUPS), step, steps, len(layers))
        if self.state["phase"] == "prune":
            self._prune_phase(layers, steps, step, local_epochs)
            self.state.update(phase="global", epoch=0, optimizer=None, scheduler=None)
            if not global_epochs:
                self.state["phase"] = "final"
        if self.state["phase"] == "global":
            self._global_phase(global_epochs)
        label = (f"{self.label}-{scheme} (Conv-{round(100 * float(cfg.SG.CONV_RATIO))}"
                 f"/FC-{round(100 * float(cfg.SG.FC_RATIO))})")
        epochs = epochs_string(self._base_epochs() or "0", steps, local_epochs, global_epochs)
        return self._finish(self._final_row(label, epochs))

    def evaluate_run(self) -> dict:
        """Evaluate the loaded model; append a results row and a metrics line."""
        seed_everything(self.hp["seed"])
        evaluation = self.evaluate("eval")
        counts = self.counts()
        meta = self.weights_meta
        label = meta.get("label") or f"{self.label}"
        epochs = str(meta.get("epochs") or (self.cfg.MODEL.WEIGHTS_EPOCHS or "-"))
        row = {"model": label, "params": counts["params"], "flops": counts["flops"],
               "top1": evaluation["top1"], "top5": evaluation["top5"], "epochs": epochs,
               "weights": str(self.cfg.MODEL.WEIGHTS)}
        line = self.reporter.results_row(row)
        self.reporter.metrics({"event": "eval", **row, "eval": evaluation})
        self.reporter.close()
        log.info("result: %s", line.strip())
        return row


@torch.no_grad()
def sync_structure(layers: dict, ctx: DistContext, t: int = 0) -> str:
    """Make groups, masks and SG weights identical on every rank after a pruning step. Each rank
    ran the same deterministic k-means on identical weights (DDP keeps them in sync); rank 0's
    groups, masks and weights are broadcast anyway, then every rank's fingerprint of its groups
    and masks is compared (a mismatch raises). Returns the fingerprint."""
    before = all_gather_object(_structure_fingerprint(layers), ctx)
    if not ctx.distributed:
        return before[0]
    for layer in layers.values():
        broadcast_tensor_(layer.group, ctx)
        broadcast_tensor_(layer.mask, ctx)
        broadcast_tensor_(layer.weight.data, ctx)
        layer.zero_pruned_()
    after = all_gather_object(_structure_fingerprint(layers), ctx)
    if len(set(before)) > 1:
        log.warning("step %d: ranks computed different groupings %s; using rank 0's", t, before)
    if len(set(after)) > 1:
        raise RuntimeError(f"step {t}: groups/masks still differ across ranks after broadcast: {after}")
    log.info("step %d: groups and masks identical on all %d ranks (fingerprint %s)", t,
             ctx.world_size, after[0])
    return after[0]


def _fraction(layers) -> float:
    layers = list(layers)
    total = sum(m.mask.numel() for m in layers)
    return 0.0 if total == 0 else 1.0 - sum(int(m.mask.sum()) for m in layers) / total


def _structure_fingerprint(layers: dict) -> str:
    return fingerprint([t for m in layers.values() for t in (m.group, m.mask)])


@torch.no_grad()
def sgdet_keep_pruned_zero(model: nn.Module) -> None:
    for m in model.modules():
        if is_sg_layer(m):
            m.zero_pruned_()


# ------------------------------------------------------------------------------- logging setup

_HANDLER_TAG = "_classification_engine"
LOGGERS = ("classification", "sgdet", "detection", "transfer")    # the pipelines' loggers


def teardown_logging() -> None:
    """Remove the handlers setup_logging added (in-process callers, tests)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if getattr(h, _HANDLER_TAG, False):
                logger.removeHandler(h)
                h.close()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def setup_logging(ctx: DistContext, output_dir: str | None = None) -> None:
    """Rank 0 logs INFO to stderr and OUTPUT_DIR/log.txt; other ranks only errors."""
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    teardown_logging()                 # a second setup (sweep runs, tests) replaces the first
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False
        if not ctx.is_main:
            logger.setLevel(logging.ERROR)
        else:
            logger.setLevel(logging.INFO)
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        if ctx.is_main and output_dir:
            os.makedirs(output_dir, exist_ok=True)
            handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt")))
        for h in handlers:
            setattr(h, _HANDLER_TAG, True)
            h.setFormatter(fmt)
            logger.addHandler(h)
