"""Engine stage: what every pipeline's command line shares. The ``VERB --config FILE [--resume]
[KEY VALUE ...]`` verb parser and its overrides, and ``session``: the process group joined (when
started by torchrun), OUTPUT_DIR locked for this run (rank 0; a second run there is refused),
rank-0 logging set up and the merged config saved beside the results."""
from __future__ import annotations

import argparse
import contextlib
import logging

from sgdet.config import save_config
from sgdet.errors import SGError
from sgdet.files import Rollback

from .distributed import cleanup, init_distributed
from .reporting import setup_logging, teardown_logging
from .runlock import RunLock

log = logging.getLogger("sgdet.engine")


def add_config_verb(sub, verb: str, help: str, example: str = "SOLVER.LR 0.01 DATA.ROOT /data/imagenet",
                    extra=None) -> argparse.ArgumentParser:
    """``VERB --config FILE [--resume] [extra arguments] [KEY VALUE ...]`` (every verb but eval
    resumes); ``extra(parser)`` adds a verb's own arguments before the overrides. Shared by the
    classification and transfer command lines."""
    p = sub.add_parser(verb, help=help, description=f"{help}. Trailing KEY VALUE pairs override the config.")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config (with _BASE_)")
    if verb != "eval":
        p.add_argument("--resume", action="store_true",
                       help="continue from OUTPUT_DIR/last_checkpoint.pt (start fresh if there is none)")
    if extra is not None:
        extra(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help=f"config overrides, e.g. {example}")
    return p


def overrides_and_resume(args) -> tuple[list[str], bool]:
    """The trailing overrides and the resume flag; ``--resume`` is accepted after the overrides
    too (argparse leaves it among them)."""
    opts = list(args.opts)
    resume = bool(getattr(args, "resume", False))
    if "--resume" in opts and args.command != "eval":
        opts.remove("--resume")
        resume = True
    return opts, resume


@contextlib.contextmanager
def session(cfg, device: str | None = None):
    """Process group (when started by torchrun), rank-0 logging, the merged config saved.
    ``device``: the config's device setting where its schema names it otherwise than DEVICE."""
    ctx = init_distributed(cfg.DEVICE if device is None else device)
    lock = None
    undo = Rollback(str(cfg.OUTPUT_DIR)) if ctx.is_main else None   # a run failing early
    failed = False                                                    # leaves no debris
    try:
        if ctx.is_main:                    # before anything is written to OUTPUT_DIR
            lock = RunLock(str(cfg.OUTPUT_DIR)).acquire()
            ctx.run_id = lock.run_id
        setup_logging(ctx, str(cfg.OUTPUT_DIR))
        if ctx.is_main:
            save_config(cfg, str(cfg.OUTPUT_DIR))
        if ctx.distributed:
            log.info("distributed: %d processes (%s), this is rank %d on %s", ctx.world_size,
                     ctx.backend, ctx.rank, ctx.device)
        yield ctx
    except SGError:
        failed = True
        raise
    finally:
        cleanup(ctx)
        teardown_logging()
        if lock is not None:
            lock.release()
            if failed:
                undo.undo()
