"""What ``tools/train_net.py`` runs in each process: load and check the config, join the process
group, build the datasets and the detector, then train (``--resume`` continues) or evaluate
(``--eval-only``). User errors are SGErrors: one line, exit status 2."""
from __future__ import annotations

import logging

from sgdet.config import load_config
from sgdet.engine.cli import session
from sgdet.engine.rng import seed_everything

from .build import build_datasets, build_detector, detector_label, num_classes_of
from .config import get_defaults, validate_config
from .trainer import DetectionTrainer

log = logging.getLogger("sgdet.detection")


def setup(args):
    """The merged, checked, frozen config of ``--config-file`` and the trailing overrides."""
    opts = list(args.opts or [])
    cfg = load_config(get_defaults(), args.config_file or None, opts)
    validate_config(cfg, training=not args.eval_only)
    return cfg


def main(args) -> dict:
    cfg = setup(args)
    with session(cfg, device=str(cfg.MODEL.DEVICE)) as ctx:
        train_ds, test_sets = build_datasets(cfg, training=not args.eval_only)
        reference = train_ds if train_ds is not None else next(iter(test_sets.values()))
        num_classes = num_classes_of(cfg, reference)
        seed_everything(int(cfg.SEED))          # the same initial heads on every rank
        model, meta = build_detector(cfg, num_classes)
        trainer = DetectionTrainer(cfg, model, train_ds, test_sets, ctx, weights_meta=meta,
                                   label=detector_label(cfg, meta))
        log.info("%s: %d training image(s), test sets %s", trainer.label,
                 0 if train_ds is None else len(train_ds),
                 ", ".join(f"{k} ({len(v)})" for k, v in test_sets.items()))
        if args.eval_only:
            return trainer.evaluate_run()
        return trainer.train(resume=args.resume)
