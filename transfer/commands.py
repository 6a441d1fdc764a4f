"""The verbs of ``python -m transfer``: finetune, eval and table (the example lives in
transfer/example.py). Each loads the config (``--config FILE`` plus ``KEY VALUE`` overrides),
joins the process group when started by torchrun, saves the merged config and runs the one
Trainer. Everything user-facing is an SGError: one line, exit status 2."""
from __future__ import annotations

import logging
import os

import sgdet
from sgdet.engine.cli import session
from sgdet.engine.distributed import DistContext, barrier
from sgdet.checkpoint import is_checkpoint
from sgdet.config import load_config, save_config
from sgdet.errors import CheckpointError, ConfigError
from sgdet.files import check_writable

from . import cub
from .config import get_defaults, validate_config
from .head import TransferTrainer, find_head, prepare_model, source_label, stem
from .report import table_markdown, write_table

log = logging.getLogger("transfer")


def load(config: str, overrides: list[str] | None = None):
    """The merged, validated, frozen config."""
    cfg = load_config(get_defaults(), config, list(overrides or []))
    validate_config(cfg)
    return cfg


def build_datasets(cfg):
    """(train, test) of DATA.NAME: CUB-200-2011 from DATA.ROOT, or scikit-learn's digits."""
    if str(cfg.DATA.NAME).lower() == "digits":
        from . import digits
        return digits.build_datasets(cfg)
    return cub.build_datasets(cfg)


def resolve_num_classes(cfg, datasets) -> int:
    """MODEL.NUM_CLASSES, or the classes of classes.txt when it is 0. A head smaller than the
    data's classes is an error; a larger one (a subset of CUB) is allowed and logged."""
    found = cub.num_classes_of(datasets)
    wanted = int(cfg.MODEL.NUM_CLASSES)
    if wanted == 0:
        return found
    if wanted < found:
        raise ConfigError(f"MODEL.NUM_CLASSES is {wanted} but {cfg.DATA.NAME} at {cfg.DATA.ROOT or '(built in)'} "
                          f"has {found} classes (set MODEL.NUM_CLASSES {found}, or 0 to follow the data)")
    if wanted > found:
        log.warning("MODEL.NUM_CLASSES %d > the %d classes of classes.txt: %d outputs stay unused",
                    wanted, found, wanted - found)
    return wanted


def finetune(cfg, ctx: DistContext, resume: bool = False, datasets=None) -> TransferTrainer:
    """Replace MODEL.WEIGHTS' classifier by a dense head and fine-tune it on CUB (SOLVER.*);
    writes OUTPUT_DIR/model_final.sg.pt, results.md and metrics.jsonl."""
    train_ds, test_ds = datasets if datasets is not None else build_datasets(cfg)
    num_classes = resolve_num_classes(cfg, (train_ds, test_ds))
    model, meta, label = prepare_model(cfg, num_classes)
    trainer = TransferTrainer(cfg, model, train_ds, test_ds, ctx, weights_meta=meta, label=label)
    log.info("%s on %s: %d train / %d test images, %d-way dense head", label, cfg.DATA.NAME,
             len(train_ds), len(test_ds), num_classes)
    trainer.train(resume=resume)
    return trainer


def evaluate(cfg, ctx: DistContext, resume: bool = False) -> TransferTrainer:
    """Top-1/top-5, Params and FLOPs of a fine-tuned model (the model_final.sg.pt of finetune, or
    a dense .pth of MODEL.ARCH with NUM_CLASSES outputs) on the test split."""
    path = os.path.expanduser(str(cfg.MODEL.WEIGHTS or ""))
    if not path:
        raise ConfigError("eval needs MODEL.WEIGHTS (the model_final.sg.pt of a finetune run)")
    if not os.path.isfile(path):
        raise CheckpointError(f"MODEL.WEIGHTS not found: {path}")
    datasets = build_datasets(cfg)
    num_classes = resolve_num_classes(cfg, datasets)
    if is_checkpoint(path):
        model = sgdet.load(path)
        meta = dict(getattr(model, "sgdet_meta", None) or {})
    else:
        kwargs = {"num_classes": num_classes}
        if cfg.MODEL.ARCH == "lenet5":
            kwargs["in_channels"] = int(cfg.MODEL.INPUT_SIZE[0])
        model = sgdet.load_dense_weights(sgdet.build(cfg.MODEL.ARCH, **kwargs), path)
        meta = {"form": "dense"}
    outputs = int(model.get_submodule(find_head(model)).out_features)
    if outputs != num_classes:
        raise ConfigError(f"{path} has a {outputs}-way classifier, not {num_classes}: eval takes a "
                          f"fine-tuned model (finetune's model_final.sg.pt), not an ImageNet one")
    trainer = TransferTrainer(cfg, model, None, datasets[1], ctx, weights_meta=meta,
                              label=source_label(cfg, meta, path))
    trainer.evaluate_run()
    return trainer


def table(cfg, ctx: DistContext, checkpoints: list[str], out: str | None = None,
          resume: bool = False) -> list[dict]:
    """Fine-tune every checkpoint with the same config into OUTPUT_DIR/<checkpoint stem>/ (a
    finished one is kept with --resume), then write Table 5 into ``out`` (default OUTPUT_DIR)."""
    if not checkpoints:
        raise ConfigError("table needs --checkpoints A [B ...]")
    stems = [stem(c) for c in checkpoints]
    for c in checkpoints:
        if not os.path.isfile(os.path.expanduser(c)):
            raise CheckpointError(f"checkpoint not found: {c}")
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise ConfigError(f"two checkpoints share the folder name {twice[0]!r}; rename one")
    if out and ctx.is_main:                # written last: say now, not after the fine-tuning
        check_writable(os.path.join(out, "table.md"), "--out")
    datasets = build_datasets(cfg)        # one copy for every run
    rows = []
    for i, (path, name) in enumerate(zip(checkpoints, stems), 1):
        sub = cfg.clone()
        sub.defrost()
        sub.MODEL.WEIGHTS = path
        sub.OUTPUT_DIR = os.path.join(str(cfg.OUTPUT_DIR), name)
        sub.freeze()
        log.info("table %d/%d: %s -> %s", i, len(checkpoints), path, sub.OUTPUT_DIR)
        if ctx.is_main:
            save_config(sub, str(sub.OUTPUT_DIR))
        trainer = finetune(sub, ctx, resume=resume, datasets=datasets)
        row = dict(trainer.state["final"])
        row.update(weights=path, folder=str(sub.OUTPUT_DIR))
        rows.append(row)
    if ctx.is_main:
        folder = out or str(cfg.OUTPUT_DIR)
        title = (f"{cfg.DATA.NAME}: {cfg.SOLVER.EPOCHS} epochs, lr {cfg.SOLVER.LR:g} "
                 f"(the same recipe for every model)")
        paths = write_table(rows, folder, title, extra={"config": str(cfg.OUTPUT_DIR),
                                                        "epochs": int(cfg.SOLVER.EPOCHS),
                                                        "lr": float(cfg.SOLVER.LR)})
        log.info("Table 5:\n%s", table_markdown(rows))
        log.info("wrote %s", ", ".join(paths.values()))
    barrier(ctx)
    return rows


def main(verb: str, config: str, overrides: list[str], resume: bool = False,
         checkpoints: list[str] | None = None, out: str | None = None):
    cfg = load(config, overrides)
    with session(cfg) as ctx:
        if verb == "finetune":
            return finetune(cfg, ctx, resume)
        if verb == "eval":
            return evaluate(cfg, ctx)
        return table(cfg, ctx, list(checkpoints or []), out, resume)
