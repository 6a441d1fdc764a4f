"""The verbs of ``python -m classification``: train, compress, eval, sweep and compare (the last in
classification/compare.py). Each loads the
config (``--config FILE`` plus ``KEY VALUE`` overrides; an unknown key is an error), joins the
process group when started by torchrun, saves the merged config beside the results and runs the
engine. Everything user-facing is an SGError (one line, exit status 2)."""
from __future__ import annotations

import logging
import os
import re

from sgdet.config import load_config, save_config
from sgdet.engine.cli import session
from sgdet.engine.distributed import DistContext, barrier
from sgdet.engine.rng import seed_everything
from sgdet.engine.trainer import Trainer
from sgdet.errors import ConfigError
from sgdet.files import write_json, write_text
from sgdet.models import pretty_arch

from . import datasets as data_module
from .config import get_defaults, validate_config
from .model import build_model


log = logging.getLogger("classification")


def load(config: str, overrides: list[str] | None = None):
    """The merged, validated, frozen config."""
    cfg = load_config(get_defaults(), config, list(overrides or []))
    validate_config(cfg)
    return cfg


def resolve_num_classes(cfg) -> int:
    """MODEL.NUM_CLASSES, or the data's class count when it is 0; a mismatch is an error."""
    found = data_module.num_classes_of(cfg)
    wanted = int(cfg.MODEL.NUM_CLASSES)
    if wanted == 0:
        return found
    if wanted != found:
        raise ConfigError(f"MODEL.NUM_CLASSES is {wanted} but {cfg.DATA.NAME} at "
                          f"{cfg.DATA.ROOT or '(default)'} has {found} classes "
                          f"(set MODEL.NUM_CLASSES {found}, or 0 to follow the data)")
    return wanted


def make_trainer(cfg, ctx: DistContext, need_train: bool = True, datasets=None) -> Trainer:
    train_ds, val_ds = datasets if datasets is not None else data_module.build_datasets(cfg)
    num_classes = resolve_num_classes(cfg)
    seed_everything(int(cfg.SEED))          # the same initial weights on every rank
    model, meta = build_model(cfg, num_classes, follow_arch=not need_train)   # eval: the file's arch
    arch = (getattr(model, "sgdet_arch", None) or {}).get("name", cfg.MODEL.ARCH)
    return Trainer(cfg, model, train_ds if need_train else None, val_ds, ctx, weights_meta=meta,
                   label=pretty_arch(arch) if arch != cfg.MODEL.ARCH else None)


def run_train(cfg, ctx: DistContext, resume: bool = False) -> Trainer:
    trainer = make_trainer(cfg, ctx)
    trainer.train(resume=resume)
    return trainer


def run_compress(cfg, ctx: DistContext, resume: bool = False, datasets=None) -> Trainer:
    trainer = make_trainer(cfg, ctx, datasets=datasets)
    trainer.compress(resume=resume)
    return trainer


def run_eval(cfg, ctx: DistContext, resume: bool = False) -> Trainer:
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("eval needs MODEL.WEIGHTS (a model_final.sg.pt or a dense .pth)")
    trainer = make_trainer(cfg, ctx, need_train=False)
    trainer.evaluate_run()
    return trainer


# ------------------------------------------------------------------------------------- sweep

def _sweep_runs(cfg) -> list[tuple[str, list, object]]:
    """[(folder name, overrides, value)] for each SWEEP value."""
    keys = [k.strip() for k in str(cfg.SWEEP.KEY).split(",") if k.strip()]
    values = list(cfg.SWEEP.VALUES)
    if not keys:
        raise ConfigError("SWEEP.KEY is empty; name the config key the sweep varies")
    if not values:
        raise ConfigError("SWEEP.VALUES is empty; list the values the sweep tries")
    defaults = {}
    for key in keys:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                raise ConfigError(f"SWEEP.KEY names an unknown config key {key}")
            node = node[part]
        if key.startswith("SWEEP.") or key == "OUTPUT_DIR":
            raise ConfigError(f"SWEEP.KEY cannot vary {key}")
        defaults[key] = node
    runs = []
    for value in values:
        vals = list(value) if len(keys) > 1 else [value]
        if len(vals) != len(keys):
            raise ConfigError(f"SWEEP.VALUES entry {value!r} must give {len(keys)} values, one for each "
                              f"of {', '.join(keys)}")
        overrides = []
        for key, v in zip(keys, vals):
            if isinstance(defaults[key], float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            overrides += [key, v]
        shown = ",".join(str(v) for v in vals)
        name = re.sub(r"[^A-Za-z0-9.,_=-]+", "-", f"{','.join(keys)}_{shown}")
        runs.append((name, overrides, value))
    return runs


def sub_config(cfg, overrides: list, folder: str, what: str = "SWEEP value"):
    """``cfg`` with ``overrides`` and OUTPUT_DIR ``folder``, validated (a sub-run of a sweep or
    comparison; ``what`` names the source of a bad value)."""
    sub = cfg.clone()
    sub.defrost()
    try:
        sub.merge_from_list(overrides + ["OUTPUT_DIR", folder])
    except (KeyError, AssertionError, ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {' '.join(str(exc).split())[:300]}") from None
    sub.freeze()
    validate_config(sub)
    return sub


def run_sweep(cfg, ctx: DistContext, resume: bool = False) -> dict:
    """Compress once per SWEEP value into OUTPUT_DIR/<key>_<value>/ (a finished sub-run is kept
    with --resume), then write sweep.md, sweep.json and sweep.png (accuracy vs compression)."""
    runs = _sweep_runs(cfg)
    subs = [(name, value, sub_config(cfg, overrides, os.path.join(str(cfg.OUTPUT_DIR), name)))
            for name, overrides, value in runs]
    keys = str(cfg.SWEEP.KEY)
    shared = None
    if not any(k.strip().startswith(("DATA.", "MODEL.INPUT_SIZE")) for k in keys.split(",")):
        shared = data_module.build_datasets(cfg)         # one copy for every sub-run
    collected = []
    for i, (name, value, sub) in enumerate(subs, 1):
        log.info("sweep %d/%d: %s = %s -> %s", i, len(subs), keys, value, sub.OUTPUT_DIR)
        if ctx.is_main:
            save_config(sub, str(sub.OUTPUT_DIR))
        trainer = run_compress(sub, ctx, resume=resume, datasets=shared)
        collected.append({"value": value, "folder": str(sub.OUTPUT_DIR), "row": trainer.state["final"],
                          "base": trainer.state.get("base"), "steps": trainer.state.get("steps", [])})
    summary = {"key": keys, "runs": collected}
    if ctx.is_main:
        from .report import plot_sweep, sweep_table
        out = str(cfg.OUTPUT_DIR)
        table = sweep_table(keys, collected)
        write_text(os.path.join(out, "sweep.md"), table)
        write_json(os.path.join(out, "sweep.json"), summary, indent=2)
        picture = plot_sweep(keys, collected, os.path.join(out, "sweep.png"),
                             title=f"{cfg.MODEL.ARCH} on {data_module.dataset_label(cfg)}: "
                                   f"accuracy vs compression ({keys})")
        log.info("sweep table:\n%s", table)
        log.info("sweep results in %s (%s)", out, os.path.basename(picture))
    barrier(ctx)
    return summary


def run_compare(cfg, ctx: DistContext, resume: bool = False) -> dict:
    from .compare import run_compare as compare      # imports this module
    return compare(cfg, ctx, resume)


VERBS = {"train": run_train, "compress": run_compress, "eval": run_eval, "sweep": run_sweep,
         "compare": run_compare}


def main(verb: str, config: str, overrides: list[str], resume: bool = False):
    cfg = load(config, overrides)
    with session(cfg) as ctx:
        return VERBS[verb](cfg, ctx, resume)
