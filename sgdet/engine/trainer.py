"""Engine stage: the one Trainer of the suite, shared by classification, transfer and detection.
Baseline training, compression (``CompressionRun``) and evaluation of a model, on one process or
many (torchrun/DDP), with AMP and channels_last on CUDA, an atomic checkpoint after every epoch
(and every ``checkpoint_period`` iterations) that ``--resume`` continues from exactly
(``CheckpointedRun``), TensorBoard, ``metrics.jsonl`` and ``results.md`` (``reporting``).

The loop is generic, as detectron2's ``SimpleTrainer``: ``run_step`` takes one batch, asks
``losses(batch)`` for the loss dict, sums it, steps the optimizer and returns what the epoch
sums. A pipeline overrides a few hooks, not the loop: ``hyperparameters`` (its config schema),
``losses``, ``collate``, ``before_step`` (LR warm-up), ``evaluate``, ``describe_evaluation``,
``row_metrics`` and ``results_line``. The defaults are image classification: cross-entropy,
top-1/top-5, samples ``(image, label)`` or ``None`` for an unreadable image.

Outputs under OUTPUT_DIR: ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``tb/``,
``results.md``, ``last_checkpoint.pt`` and the final model (``model_final.sg.pt``)."""
from __future__ import annotations

import itertools
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import sgdet
from sgdet.errors import ConfigError, NumericalError
from sgdet.layers import is_sg_layer
from sgdet.models import pretty_arch

from .checkpointing import CheckpointedRun, fresh_state
from .compression import CompressionRun
from .data import ResumableSampler, ShardSampler, collate_skipping_bad, may_yield_none
from .distributed import DistContext, all_gather_object, all_reduce_min, all_reduce_sum
from .reporting import Reporter, epochs_string
from .rng import seed_everything

log = logging.getLogger("sgdet.engine")

FINAL = "model_final.sg.pt"
LOG_PERIOD = 20          # iterations between progress lines in the log (without a progress bar)
LOG_SECONDS = 10.0       # ... and at least this many seconds between them


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def keep_pruned_zero(model: nn.Module) -> None:
    """Zero the pruned weights of every SG layer (an optimiser's momentum must not revive them)."""
    for m in model.modules():
        if is_sg_layer(m):
            m.zero_pruned_()


def lr_factor_fn(cfg):
    """Multiplier of SOLVER.LR at a (0-based) epoch of global training (classification schema)."""
    kind, epochs = cfg.SOLVER.SCHEDULE, max(int(cfg.SOLVER.EPOCHS), 1)
    milestones, gamma = [int(m) for m in cfg.SOLVER.MILESTONES], float(cfg.SOLVER.GAMMA)

    def factor(epoch: int) -> float:
        if kind == "multistep":
            return gamma ** sum(1 for m in milestones if epoch >= m)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))
        return 1.0
    return factor


class Trainer(CheckpointedRun, CompressionRun):
    """Train, compress or evaluate ``model`` on ``train_ds``/``val_ds`` as ``cfg`` says.

    ``weights_meta``: the meta of the checkpoint the weights came from (its ``epochs`` fill the
    Epochs column). ``label``: the model's name in the results table (default from MODEL.ARCH).
    Call ``train()``, ``compress()`` or ``evaluate_run()``; each returns the result row."""

    final_name = FINAL
    scheduler = None        # the global phase's LR scheduler, once it runs
    collate = staticmethod(collate_skipping_bad)
    nan_advice = "lower the learning rate"

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
        self.reporter = Reporter(self.output_dir, self.ctx.is_main, self.ctx.run_id)
        self.input_size = self.hp["input_size"]
        self.min_batch = 2 if has_batchnorm(model) else 1
        self.state = fresh_state("train")
        self.train_loader = self._train_loader(train_ds) if train_ds is not None else None
        self.val_loader = self._val_loader(val_ds)
        self.may_skip = may_yield_none(train_ds) or may_yield_none(val_ds)
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
        sampler = ResumableSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                   seed=hp["seed"], drop_last=False)
        batch = hp["batch_size"]
        # a private generator (seeded per pass in train_epoch): without one, creating the
        # iterator draws a worker seed from the global RNG, and a run resumed mid-epoch drew it
        # from a different point of that stream than the run it continues (issue 15, bug 1)
        return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=hp["workers"],
                          collate_fn=self.collate, pin_memory=ctx.cuda, drop_last=len(sampler) > batch,
                          generator=torch.Generator())

    def _val_loader(self, ds: Dataset) -> DataLoader:
        if len(ds) == 0:
            raise ConfigError("the validation set is empty")
        sampler = ShardSampler(len(ds), self.ctx.rank, self.ctx.world_size)
        # a private generator: a loader without one draws its worker seed from the global RNG,
        # so evaluating would shift the training augmentations that follow (issue 15, bug 2)
        return DataLoader(ds, batch_size=self.hp["test_batch_size"], sampler=sampler,
                          num_workers=self.hp["workers"], collate_fn=self.collate,
                          pin_memory=self.ctx.cuda, generator=torch.Generator().manual_seed(0))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp) if self.ctx.cuda \
            else torch.autocast("cpu", enabled=False)

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]   # frozen stages stay out
        return torch.optim.SGD(params, lr=lr, momentum=self.hp["momentum"],
                               weight_decay=self.hp["weight_decay"])

    # ------------------------------------------------------------- the pipelines' hooks
    def hyperparameters(self) -> dict:
        """What the generic loop reads from the config, by name (the classification schema); a
        pipeline with another schema (detection's detectron2-style keys) overrides this."""
        cfg = self.cfg
        return {"seed": int(cfg.SEED), "amp": bool(cfg.AMP), "channels_last": bool(cfg.CHANNELS_LAST),
                "input_size": tuple(int(v) for v in cfg.MODEL.INPUT_SIZE),
                "batch_size": int(cfg.DATA.BATCH_SIZE), "test_batch_size": int(cfg.DATA.TEST_BATCH_SIZE),
                "workers": int(cfg.DATA.WORKERS), "lr": float(cfg.SOLVER.LR),
                "momentum": float(cfg.SOLVER.MOMENTUM), "weight_decay": float(cfg.SOLVER.WEIGHT_DECAY),
                "epochs": int(cfg.SOLVER.EPOCHS), "eval_period": int(cfg.SOLVER.EVAL_PERIOD),
                "checkpoint_period": int(cfg.SOLVER.CHECKPOINT_PERIOD), "lr_factor": lr_factor_fn(cfg),
                "count_convention": str(cfg.COUNT.CONVENTION)}

    def default_label(self) -> str:
        return pretty_arch(self.cfg.MODEL.ARCH)

    def counts(self) -> dict:
        return sgdet.count(self.model, self.input_size, self.hp.get("count_convention", "sgdet"))

    def losses(self, batch) -> tuple[dict | None, dict]:
        """Forward one batch: (its loss dict, or None to skip the batch; statistics the epoch
        sums, where ``samples`` weights the mean losses). Classification: cross-entropy; a batch
        left with fewer than ``min_batch`` readable images is skipped on every rank at once."""
        images, labels, n_skipped = batch
        stats = {"skipped": n_skipped}
        n = labels.numel()
        if self.may_skip and self.ctx.distributed:
            n = all_reduce_min(n, self.ctx)     # every rank steps or none does
        if n < self.min_batch:
            return None, {**stats, "small": 1}
        images, labels = self._inputs(images, labels)
        logits = self.net(images)
        stats.update(samples=labels.numel(), correct=(logits.detach().argmax(1) == labels).sum())
        return {"loss": F.cross_entropy(logits, labels)}, stats

    def before_step(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """Called before each step with the run's iteration count (detection: LR warm-up)."""

    # ------------------------------------------------------------------------- one epoch
    def run_step(self, batch, optimizer: torch.optim.Optimizer) -> dict:
        """One iteration: the loss dict of ``batch``, its sum back-propagated (AMP-scaled) and
        the optimizer stepped. Returns what the epoch sums (losses weighted by ``samples``)."""
        with self._autocast():
            loss_dict, stats = self.losses(batch)
        if loss_dict is None:
            return dict(stats)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        weight = stats.setdefault("samples", 1)
        sums = {key: value.detach().double() * weight for key, value in loss_dict.items()}
        if len(loss_dict) > 1 or "loss" not in loss_dict:
            sums["loss"] = loss.detach().double() * weight
        return {**stats, **sums, "steps": 1}

    def train_epoch(self, optimizer: torch.optim.Optimizer, desc: str,
                    max_steps: int | None = None) -> dict:
        """One pass over this rank's shard, from the iteration a resumed checkpoint stopped at
        (or its first ``max_steps`` batches: local fine-tuning by iterations), with a checkpoint
        every ``checkpoint_period`` iterations. Returns the epoch's mean losses and statistics."""
        s, loader = self.state, self.train_loader
        loader.sampler.set_epoch(s["epochs_seen"])
        done = int(s.get("iteration") or 0)
        loader.sampler.skip = min(done * self.hp["batch_size"], len(loader.sampler))
        # the same worker seed for this pass whether it starts fresh or resumes mid-way
        loader.generator.manual_seed(int(self.hp["seed"]) * 1_000_003 + int(s["epochs_seen"]) * 10_007
                                     + int(s["iterations_total"]) - done)
        batches = loader if max_steps is None else itertools.islice(loader, max(max_steps - done, 0))
        total = done + (len(loader) if max_steps is None else min(len(loader), max_steps - done))
        sums: dict = dict(s.get("partial_sums") or {})
        period = int(self.hp.get("checkpoint_period") or 0)
        started, first = time.time(), done
        last_line = started
        self.net.train()
        bar = tqdm(batches, total=total - done, desc=desc, leave=False, dynamic_ncols=True,
                   disable=self.progress_disabled)
        for batch in bar:
            self.before_step(optimizer, int(s["iterations_total"]))
            for key, value in self.run_step(batch, optimizer).items():
                sums[key] = sums.get(key, 0) + value
            done += 1
            s["iteration"] = done
            s["iterations_total"] = int(s["iterations_total"]) + 1
            if "loss" in sums and (not self.ctx.cuda or done % LOG_PERIOD == 0 or done == total):
                value = float(sums["loss"]) / max(float(sums.get("samples", 1)), 1)
                if not math.isfinite(value) and not self.amp:
                    raise NumericalError(f"{desc}: the training loss became {value} at iteration "
                                         f"{done}; {self.nan_advice}")
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
                now = time.time()
                # without a bar (no terminal: a log file, `| tee`) a line now and then says how far
                due = done % LOG_PERIOD == 0 and now - last_line >= LOG_SECONDS
                if bar.disable and (due or done == total):
                    last_line = now
                    rate = (done - first) / max(now - started, 1e-9)
                    eta = (total - done) / max(rate, 1e-9)
                    log.info("%s iter %d/%d  loss %.4f  lr %.2e  %.1f it/s  eta %s", desc, done, total,
                             value, optimizer.param_groups[0]["lr"], rate,
                             time.strftime("%H:%M:%S", time.gmtime(eta)))
            if period and done % period == 0 and done < total:
                s["partial_sums"] = {k: float(v) for k, v in sums.items()}
                self.save_checkpoint(optimizer, self.scheduler)
        bar.close()
        keep_pruned_zero(self.model)
        s["iteration"], s["partial_sums"] = 0, None
        keys = sorted(set().union(*all_gather_object(sorted(sums), self.ctx)))
        totals = dict(zip(keys, all_reduce_sum([float(sums.get(k, 0)) for k in keys], self.ctx)))
        return self.epoch_stats(totals, desc, time.time() - started)

    def epoch_stats(self, totals: dict, desc: str, seconds: float) -> dict:
        """The epoch's record from the statistics summed over all ranks."""
        samples = max(totals.get("samples", 0), 1)
        stats = {k: v / samples for k, v in totals.items() if k.startswith("loss")}
        stats.setdefault("loss", math.nan)
        if "correct" in totals:
            stats["train_top1"] = 100 * totals["correct"] / samples
        if totals.get("skipped"):
            log.warning("%s: skipped %d unreadable training image(s)", desc, int(totals["skipped"]))
        if totals.get("small"):
            log.info("%s: skipped %d batch(es) left with fewer than %d readable image(s)",
                     desc, int(totals["small"]), self.min_batch)
        stats.update(skipped=int(totals.get("skipped", 0)),
                     iterations=int(totals.get("steps", 0) / self.ctx.world_size),
                     seconds=round(seconds, 2))
        return stats

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

    # ------------------------------------------------------------------------- reporting
    def describe_evaluation(self, evaluation: dict) -> tuple[dict, dict, str]:
        """(fields for the epoch's metrics line, TensorBoard scalars, log text) of an evaluation."""
        return ({f"val_{k}": v for k, v in evaluation.items()},
                {"val_top1": evaluation["top1"], "val_top5": evaluation["top5"]},
                f"val top-1 {evaluation['top1']:.2f}%  top-5 {evaluation['top5']:.2f}%")

    def row_metrics(self, evaluation: dict, counts: dict) -> dict:
        """The accuracy columns of a results row."""
        return {"top1": evaluation["top1"], "top5": evaluation["top5"]}

    def results_line(self, row: dict) -> str:
        return self.reporter.results_row(row)

    def _log_epoch(self, phase: str, stats: dict, lr: float, evaluation: dict | None, **extra) -> None:
        s = self.state
        s["tick"] += 1
        record = {"event": "epoch", "phase": phase, **extra, "lr": lr, **stats}
        scalars = {f"{phase}/{k}": v for k, v in stats.items() if k.startswith("loss") or k == "train_top1"}
        scalars[f"{phase}/lr"] = lr
        where = " ".join(f"{k} {v}" for k, v in extra.items())
        msg = f"{phase} {where}: loss {stats['loss']:.4f}"
        if "train_top1" in stats:
            msg += f"  train top-1 {stats['train_top1']:.2f}%"
        msg += f"  lr {lr:.2e}  ({stats['iterations']} iterations)"
        if evaluation is not None:
            fields, eval_scalars, text = self.describe_evaluation(evaluation)
            record.update(fields)
            scalars.update({f"{phase}/{k}" if "/" not in k else k: v for k, v in eval_scalars.items()})
            msg += "  " + text
        self.reporter.metrics(record)
        self.reporter.scalars(s["tick"], scalars)
        log.info("%s  (%.1f s)", msg, stats["seconds"])

    # ------------------------------------------------------------------------------ phases
    def _global_phase(self, epochs: int) -> None:
        """``epochs`` of SGD with the config's schedule (baseline training or global
        fine-tuning), a checkpoint after each epoch."""
        s = self.state
        optimizer = self._optimizer(self.hp["lr"])
        factor = self.hp["lr_factor"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: factor(e))
        self.scheduler = scheduler          # periodic checkpoints inside an epoch save it too
        if s["epoch"] > 0 or s.get("iteration"):
            self._load_optimizer(optimizer, scheduler)
        period = self.hp["eval_period"]
        phase = "train" if s["kind"] == "train" else "global"
        while s["epoch"] < epochs:
            lr = optimizer.param_groups[0]["lr"]
            stats = self.train_epoch(optimizer, f"{phase} {s['epoch'] + 1}/{epochs}")
            scheduler.step()
            s["epoch"] += 1
            s["epochs_seen"] += 1
            evaluation = None
            if period and (s["epoch"] % period == 0 or s["epoch"] == epochs):
                evaluation = self.evaluate(f"eval {s['epoch']}/{epochs}")
            s["last_eval"] = evaluation
            self._log_epoch(phase, stats, lr, evaluation, epoch=s["epoch"], of=epochs)
            self.save_checkpoint(optimizer, scheduler)
        s["phase"] = "final"

    # --------------------------------------------------------------------------------- runs
    def _finish(self, row: dict) -> dict:
        """Write the final model, the results row and the final metrics; mark the run done."""
        s, cfg = self.state, self.cfg
        meta = {"label": row["model"], "epochs": row["epochs"], "eval": s["final_eval"],
                "counts": {"params": row["params"], "flops": row["flops"]}, "kind": s["kind"],
                "config": cfg.dump(), "steps": s["steps"], "base": s["base"]}
        if s["kind"] == "compress":
            meta.update(scheme=str(cfg.SG.SCHEME).upper(), conv_ratio=float(cfg.SG.CONV_RATIO),
                        fc_ratio=float(cfg.SG.FC_RATIO), groups=int(cfg.SG.GROUPS),
                        step=float(cfg.SG.STEP))
        if self.ctx.is_main:
            sgdet.save(self.model, os.path.join(self.output_dir, self.final_name), meta=meta)
        line = self.results_line(row)
        fields = self.describe_evaluation(s["final_eval"])[0] if s["final_eval"] else {}
        self.reporter.metrics({"event": "final", **row, "eval": fields.get("eval", s["final_eval"])})
        s["tick"] += 1
        self.reporter.scalars(s["tick"], {"final/top1": row.get("top1"), "final/top5": row.get("top5"),
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
               **self.row_metrics(evaluation, counts), "epochs": epochs}
        if s["kind"] == "compress" and s["steps"]:
            last = s["steps"][-1]
            row.update(conv_pruned=last["conv_pruned"], fc_pruned=last["fc_pruned"],
                       network_pruned=last["network_pruned"])
        if s.get("base"):
            base = s["base"]
            row.update(params_pruned=1 - counts["params"] / base["params"],
                       flops_pruned=1 - counts["flops"] / base["flops"])
        return row

    def _base_epochs(self) -> str | None:
        """The Epochs column's first term: training behind MODEL.WEIGHTS."""
        if int(self.cfg.MODEL.get("WEIGHTS_EPOCHS", 0)) > 0:
            return str(int(self.cfg.MODEL.WEIGHTS_EPOCHS))
        if self.weights_meta.get("epochs"):
            return str(self.weights_meta["epochs"])
        return "?" if self.cfg.MODEL.WEIGHTS else None

    def train_label(self) -> str:
        """The results row's name of a training run."""
        return f"{self.label} baseline"

    def train(self, resume: bool = False) -> dict:
        """Training (baseline, or fine-tuning of MODEL.WEIGHTS) for the configured epochs with
        the configured schedule; writes the final model and a results row."""
        self._start("train", resume)
        done = self._already_done()
        if done is not None:
            return done
        if self.train_loader is None:
            raise ConfigError("training needs a training set")
        self._wrap()
        if self.state["phase"] == "global":
            self._global_phase(self.hp["epochs"])
        epochs = epochs_string(self._base_epochs(), global_=self.hp["epochs"])
        return self._finish(self._final_row(self.train_label(), epochs))

    def evaluate_run(self) -> dict:
        """Evaluate the loaded model; append a results row and a metrics line."""
        seed_everything(self.hp["seed"])
        evaluation = self.evaluation = self.evaluate("eval")
        counts = self.counts()
        meta = self.weights_meta
        label = meta.get("label") or f"{self.label}"
        epochs = str(meta.get("epochs") or (self.cfg.MODEL.get("WEIGHTS_EPOCHS", 0) or "-"))
        row = {"model": label, "params": counts["params"], "flops": counts["flops"],
               **self.row_metrics(evaluation, counts), "epochs": epochs, "weights": str(self.cfg.MODEL.WEIGHTS)}
        line = self.results_line(row)
        fields = self.describe_evaluation(evaluation)[0]
        self.reporter.metrics({"event": "eval", **row, "eval": fields.get("eval", evaluation)})
        self.reporter.close()
        log.info("result: %s", line.strip())
        return row
