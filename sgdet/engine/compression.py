"""Engine stage: a compression run (Algorithm 1 with the G, LG and L fine-tuning schemes) on the
Trainer. The schedule and the pruning step are the core's (``sgdet.schedule``; SG.GROUPING
``fixed`` swaps k-means for fixed equal groups where a schema has that key); this adds what a
long run needs around them: local fine-tuning epochs after each step, a checkpoint after each
step and each local epoch, the groups and masks made identical on every rank, and step records
in the reports. Mixed into the Trainer.

Run state machine (what ``last_checkpoint.pt`` records)::

    prune t=1 -> [local epoch 1..L] -> step eval -> prune t=2 ... t=T -> global epoch 1..E
    -> final (model_final.sg.pt, results row) -> done
"""
from __future__ import annotations

import logging
import time

import sgdet
from sgdet.errors import ConfigError
from sgdet.schedule import Schedule, StepRecord, prune_step

from .distributed import sync_structure
from .reporting import epochs_string

log = logging.getLogger("sgdet.engine")


def grouping_of(cfg) -> str:
    """SG.GROUPING (``kmeans`` where a schema has no such key)."""
    return str(cfg.SG.get("GROUPING", "kmeans"))


def scheme_epochs(cfg, epochs: int) -> tuple[int, int]:
    """(local epochs after each step, global epochs) of SG.SCHEME (G: global only, LG: local after
    every step + global, L: local only); ``epochs`` is the global phase's length."""
    scheme = str(cfg.SG.SCHEME).upper()
    return (int(cfg.SG.LOCAL_EPOCHS) if scheme in ("LG", "L") else 0,
            epochs if scheme in ("G", "LG") else 0)


class CompressionRun:
    """``Trainer.compress()`` and its pruning phase (see the module docstring)."""

    def compress(self, resume: bool = False) -> dict:
        """Algorithm 1 on the loaded weights with the SG.SCHEME fine-tuning (G: global only, LG:
        local after every step + global, L: local only); writes model_final.sg.pt."""
        cfg = self.cfg
        scheme = str(cfg.SG.SCHEME).upper()
        schedule = Schedule(float(cfg.SG.CONV_RATIO), float(cfg.SG.FC_RATIO), float(cfg.SG.STEP))
        local_epochs, global_epochs = scheme_epochs(cfg, self.hp["epochs"])
        if (local_epochs or global_epochs) and self.train_loader is None:
            raise ConfigError(f"scheme {scheme} fine-tunes and needs a training set")
        resumed = self._start("compress", resume)
        done = self._already_done()
        if done is not None:
            return done
        if not cfg.MODEL.WEIGHTS and not resumed:
            log.warning("MODEL.WEIGHTS is empty: compressing a randomly initialised %s", cfg.MODEL.ARCH)
        if self.state["base"] is None:
            base = self._record_base()
            if cfg.SG.EVAL_EACH_STEP:
                log.info("before pruning: val top-1 %.2f%%  top-5 %.2f%%", base["top1"], base["top5"])
        layers = sgdet.convert(self.model, list(cfg.SG.INCLUDE), list(cfg.SG.EXCLUDE))
        if not layers:
            raise ConfigError("the model has no compressible Conv2d/Linear layers")
        self._place()
        self._wrap()
        log.info("self-grouping %s: scheme %s, Conv-%g/FC-%g, g=%d (%s), step %g -> %d step(s), %d SG layers",
                 cfg.MODEL.ARCH, scheme, round(100 * float(cfg.SG.CONV_RATIO), 4),
                 round(100 * float(cfg.SG.FC_RATIO), 4), int(cfg.SG.GROUPS), grouping_of(cfg),
                 schedule.effective_step,
                 schedule.steps, len(layers))
        if self.state["phase"] == "prune":
            self._prune_phase(layers, schedule, local_epochs)
            self.state.update(phase="global", epoch=0, optimizer=None, scheduler=None)
            if not global_epochs:
                self.state["phase"] = "final"
        if self.state["phase"] == "global":
            self._global_phase(global_epochs)
        label = (f"{self.label}-{scheme} (Conv-{round(100 * float(cfg.SG.CONV_RATIO))}"
                 f"/FC-{round(100 * float(cfg.SG.FC_RATIO))})")
        if grouping_of(cfg) != "kmeans":
            label += f" {grouping_of(cfg)} groups"
        epochs = epochs_string(self._base_epochs() or "0", schedule.steps, local_epochs, global_epochs)
        return self._finish(self._final_row(label, epochs))

    def _record_base(self) -> dict:
        """The dense network, before anything is pruned: its counts (and evaluation where
        SG.EVAL_EACH_STEP) into ``state["base"]`` and the metrics."""
        base = dict(self.counts())
        if self.cfg.SG.EVAL_EACH_STEP:
            evaluation = self.evaluate("eval baseline")
            base.update(top1=evaluation["top1"], top5=evaluation["top5"], loss=evaluation["loss"])
        self.state["base"] = base
        self.reporter.metrics({"event": "baseline", **base})
        return base

    def _prune_phase(self, layers: dict, schedule: Schedule, local_epochs: int) -> None:
        """The schedule's steps, each followed by ``local_epochs`` epochs at SG.LOCAL_LR, with a
        checkpoint after each pruning step and each local epoch."""
        cfg, s = self.cfg, self.state
        groups, seed, n_init = int(cfg.SG.GROUPS), int(cfg.SEED), int(cfg.SG.N_INIT)
        grouping = grouping_of(cfg)
        warned: set[str] = set()
        while True:
            if s["step_done"]:
                if s["t"] >= schedule.steps:
                    break
                t = s["t"] + 1
                conv_target, fc_target = schedule.targets(t)
                started = time.time()
                summary = prune_step(layers, conv_target, fc_target, groups, seed, n_init, warned,
                                     grouping)
                sync_structure(layers, self.ctx, t)
                record = StepRecord.measure(t, conv_target, fc_target, layers, summary)
                s.update(t=t, local_done=0, step_done=False, optimizer=None, pending=record.to_dict())
                log.info("pruning step %d/%d: conv %.1f%% (target %.1f%%), FC %.1f%% (target %.1f%%), "
                         "network %.1f%%  (%.1f s)", t, schedule.steps, 100 * record.conv_pruned,
                         100 * conv_target, 100 * record.fc_pruned, 100 * fc_target,
                         100 * record.network_pruned, time.time() - started)
                self.save_checkpoint()
            t = s["t"]
            if s["local_done"] < local_epochs:
                optimizer = self._optimizer(float(cfg.SG.LOCAL_LR))
                if s["local_done"] > 0 or s.get("iteration"):
                    self._load_optimizer(optimizer)
            while s["local_done"] < local_epochs:
                stats = self.train_epoch(optimizer, f"local t={t} {s['local_done'] + 1}/{local_epochs}")
                s["local_done"] += 1
                s["epochs_seen"] += 1
                self._log_epoch("local", stats, float(cfg.SG.LOCAL_LR), None, t=t,
                                epoch=s["local_done"], of=local_epochs)
                self.save_checkpoint(optimizer)
            self._record_step(t)
            s["step_done"] = True
            self.save_checkpoint()

    def _record_step(self, t: int) -> None:
        """Evaluate the finished step (SG.EVAL_EACH_STEP) and report it."""
        s = self.state
        record = dict(s.pop("pending", None) or {"step": t})
        evaluation = self.evaluate(f"eval t={t}") if self.cfg.SG.EVAL_EACH_STEP else None
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
