"""Engine stage: a run's state on disk, for exact resume. ``last_checkpoint.pt`` is an sgdet
checkpoint (``sgdet.load`` reads its model) whose ``train_state`` entry holds where the run is
(phase, pruning step, epoch, iteration inside the epoch), the optimizer, LR scheduler, AMP scaler,
every rank's RNG states and the sizes of the report files; ``--resume`` restores all of it and
cuts the report files back to those sizes. Mixed into the Trainer."""
from __future__ import annotations

import logging
import os

import sgdet
from sgdet.checkpoint import plain, read
from sgdet.errors import CheckpointError, ConfigError
from sgdet.files import remove_stale_temporaries

from .distributed import all_gather_object, barrier
from .rng import rng_state, seed_everything, set_rng_state

log = logging.getLogger("sgdet.engine")

CHECKPOINT = "last_checkpoint.pt"
_RAW_STATE = ("optimizer", "scheduler", "scaler", "rng")     # kept as saved (not made plain)


def fresh_state(kind: str) -> dict:
    """The run state at the start of a ``train`` or ``compress`` run."""
    return {"kind": kind, "phase": "prune" if kind == "compress" else "global",
            "t": 0, "local_done": 0, "step_done": True, "epoch": 0, "epochs_seen": 0, "tick": 0,
            "iteration": 0, "iterations_total": 0, "partial_sums": None,
            "steps": [], "base": None, "final": None, "last_eval": None,
            "optimizer": None, "scheduler": None, "scaler": None}


class CheckpointedRun:
    """Saving, loading and resuming the Trainer's run state (see the module docstring)."""

    def checkpoint_path(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT)

    def save_checkpoint(self, optimizer=None, scheduler=None) -> None:
        """Atomic ``last_checkpoint.pt``. Collective: every rank must call it."""
        rngs = all_gather_object(rng_state(self.device), self.ctx)
        if self.ctx.is_main:
            state = {k: v for k, v in self.state.items() if k not in _RAW_STATE}
            state.update(world_size=self.ctx.world_size, offsets=self.reporter.offsets(),
                         run_id=self.reporter.run_id,
                         config=self.cfg.dump())
            state = plain(state, "train_state")
            # optimiser state keeps its integer keys (plain() would make them strings)
            state["optimizer"] = optimizer.state_dict() if optimizer is not None else None
            state["scheduler"] = plain(scheduler.state_dict()) if scheduler is not None else None
            state["scaler"] = self.scaler.state_dict() if self.amp else None
            state["rng"] = rngs
            meta = {"label": self.label, "kind": state["kind"], "phase": state["phase"],
                    "t": state["t"], "epoch": state["epoch"]}
            sgdet.save(self.model, self.checkpoint_path(), meta=meta, extra={"train_state": state})
        barrier(self.ctx)

    def load_checkpoint(self, kind: str) -> bool:
        """Restore model, masks and run state from ``last_checkpoint.pt``; False if there is none."""
        path = self.checkpoint_path()
        if not os.path.isfile(path):
            log.info("no checkpoint in %s; starting from the beginning", self.output_dir)
            return False
        state = read(path).get("train_state")
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
        self.state = {**fresh_state(kind), **state}
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
        inside = f", {s['iteration']} iteration(s) into the next epoch" if s.get("iteration") else ""
        if s["phase"] == "prune":
            return f"pruning step {s['t']}, {s['local_done']} local epoch(s) done{inside}"
        if s["phase"] == "global":
            return f"{s['epoch']} global epoch(s) done{inside}"
        return s["phase"]

    def _start(self, kind: str, resume: bool) -> bool:
        """Fresh state (seeded) or the checkpoint's; True when resumed."""
        resumed = resume and self.load_checkpoint(kind)
        if self.ctx.is_main:
            remove_stale_temporaries(self.output_dir)      # half-written files of a killed run
        if resumed:
            if self.state.get("config") not in (None, self.cfg.dump()):
                log.warning("the config differs from the one the checkpoint was written with; "
                            "continuing with the new one")
            self.reporter.rewind(self.state.get("offsets"), int(self.state["tick"]))
            # the resumed run is the same run: its report lines keep the id they started with
            self.reporter.run_id = self.state.get("run_id") or self.reporter.run_id
            self._restore_rng()
        else:
            if not resume and os.path.isfile(self.checkpoint_path()):
                log.info("starting afresh over %s (pass --resume to continue it)", self.checkpoint_path())
            self.state = fresh_state(kind)
            seed_everything(self.hp["seed"] + self.ctx.rank)
            # before anything is written: a run killed from here on resumes and rewinds the
            # metrics and results files to this point
            self.save_checkpoint()
        return resumed

    def _load_optimizer(self, optimizer, scheduler=None) -> None:
        if self.state.get("optimizer") is not None:
            optimizer.load_state_dict(self.state["optimizer"])
        if scheduler is not None and self.state.get("scheduler") is not None:
            scheduler.load_state_dict(self.state["scheduler"])
        if self.amp and self.state.get("scaler"):
            self.scaler.load_state_dict(self.state["scaler"])

    def _already_done(self) -> dict | None:
        if self.state.get("phase") == "done" and self.state.get("final"):
            log.info("this run already finished; nothing to do (%s)", self.state["final"]["model"])
            self.reporter.close()
            return self.state["final"]
        return None
