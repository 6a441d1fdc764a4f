#!/usr/bin/env python
"""Detection entry point for detectron2 users (training and evaluation under detectron2's own
DefaultTrainer, with the SG backbones of sgdet.detection.backbones.detectron2_compat):

    python tools/train_net_detectron2.py --config-file configs/detectron2/faster_rcnn_sg_r50_c4.yaml \\
        MODEL.SG.WEIGHTS resnet50_g_conv60_fc60.sg.pt OUTPUT_DIR out/d2_r50_c4
    python tools/train_net_detectron2.py --config-file ... --num-gpus 8
    python tools/train_net_detectron2.py --config-file ... --eval-only MODEL.WEIGHTS out/d2_r50_c4/model_final.pth
    python tools/train_net_detectron2.py --config-file ... --resume

detectron2's flags and config keys, plus MODEL.SG.* and DATASETS.ROOT / DATASETS.REGISTER (added
before the yaml is merged). Without detectron2 installed: one line saying so, exit 2; the suite's
own engine is tools/train_net.py. Thin: the bridge lives in detectron2_compat.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

PROG = "train_net_detectron2.py"


def setup_cfg(args):
    """detectron2's config with the SG keys, the yaml and the overrides merged (one-line errors)."""
    from detectron2.config import get_cfg

    from sgdet.detection.backbones import detectron2_compat as sg_d2
    from sgdet.errors import ConfigError
    cfg = get_cfg()
    sg_d2.add_sg_config(cfg)
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"config file not found: {args.config_file!r}")
    for where, merge in ((args.config_file, lambda: cfg.merge_from_file(args.config_file)),
                         ("override", lambda: cfg.merge_from_list(args.opts))):
        try:
            merge()
        except (KeyError, ValueError, AssertionError) as exc:
            raise ConfigError(f"{where}: {exc.args[0] if exc.args else exc}") from None
    cfg.freeze()
    return cfg


def _trainer_class():
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
    return Trainer


def worker(args):
    """One process: set up, register the config's datasets, train or evaluate."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import default_setup

    from sgdet.detection.backbones import detectron2_compat as sg_d2
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    sg_d2.register_config_datasets(cfg)
    Trainer = _trainer_class()
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check(args) -> None:
    """What can be checked before any process starts, so bad input is one line, not a traceback
    from inside a launched worker."""
    from sgdet.detection.backbones import detectron2_compat as sg_d2
    from sgdet.errors import CheckpointError, ConfigError
    cfg = setup_cfg(args)
    sg_d2.register_config_datasets(cfg)
    sg_d2.check_sg_config(cfg)
    weights = cfg.MODEL.WEIGHTS
    if args.eval_only and not weights and not args.resume:
        raise ConfigError("--eval-only needs MODEL.WEIGHTS (a detectron2 checkpoint, e.g. OUTPUT_DIR/model_final.pth)")
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise CheckpointError(f"MODEL.WEIGHTS not found: {weights} (the compressed .sg.pt goes in MODEL.SG.WEIGHTS)")


def main(argv=None) -> int:
    try:
        from detectron2.engine import default_argument_parser, launch
        import sgdet.detection.backbones.detectron2_compat  # noqa: F401  (registers the backbones)
    except ImportError as exc:
        print(f"{PROG}: error: detectron2 is needed ({exc}); install it from "
              "https://github.com/facebookresearch/detectron2, or use tools/train_net.py", file=sys.stderr)
        return 2
    from sgdet.errors import run_entry_point
    args = default_argument_parser().parse_args(argv)
    for flag in ("--resume", "--eval-only"):     # allowed after the overrides too
        if flag in args.opts:
            args.opts.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)

    def run():
        check(args)
        launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    return run_entry_point(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
