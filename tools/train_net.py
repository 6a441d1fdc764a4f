#!/usr/bin/env python
"""Detection entry point (detectron2's tools/train_net.py, on torchvision's Faster R-CNN):

    python tools/train_net.py --config-file configs/faster_rcnn_sg_r50.yaml MODEL.WEIGHTS r50.sg.pt
    python tools/train_net.py --config-file ... --num-gpus 8          # or under torchrun
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file ... --resume

Thin: parses the flags and hands over to sgdet.detection.commands. Errors print one line, exit 2."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from sgdet.engine.launch import default_argument_parser, launch  # noqa: E402
from sgdet.errors import run_entry_point  # noqa: E402


def main(argv=None):
    args = default_argument_parser().parse_args(argv)
    for flag in ("--resume", "--eval-only"):     # allowed after the overrides too
        if flag in args.opts:
            args.opts.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)
    from sgdet.detection import commands
    return run_entry_point("train_net.py", lambda: launch(
        commands.main, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args))


if __name__ == "__main__":
    sys.exit(main())
