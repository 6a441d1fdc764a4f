"""Entry point: ``python -m classification VERB ...`` (or ``torchrun ... -m classification VERB``).

    train     --config FILE [--resume] [KEY VALUE ...]   baseline training
    compress  --config FILE [--resume] [KEY VALUE ...]   self-grouping (Algorithm 1, schemes G/LG/L)
    eval      --config FILE [KEY VALUE ...]              top-1/top-5, Params, FLOPs of MODEL.WEIGHTS
    sweep     --config FILE [--resume] [KEY VALUE ...]   one compress run per SWEEP value + curves
    compare   --config FILE [--resume] [KEY VALUE ...]   SG-CNN against its rivals at the same budget
    demo      [...]                                      LeNet-5 on Fashion-MNIST end to end

Thin: parses arguments and calls the pipeline; user errors print one line and exit 2."""
import sys

from sgdet.engine.cli import add_config_verb, overrides_and_resume
from sgdet.errors import ArgumentParser, run_entry_point

_HELP = {"train": "baseline training (SOLVER.*)",
         "compress": "self-grouping compression with the SG.SCHEME fine-tuning",
         "eval": "evaluate MODEL.WEIGHTS: top-1/top-5, Params, FLOPs",
         "sweep": "one compress run per SWEEP.VALUES entry, table and accuracy-vs-compression curves",
         "compare": "SG-CNN, fixed groups, unstructured and channel pruning at the same COMPARE budget: "
                    "accuracy, counts and CPU latency"}


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m classification", voice="classification")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in ("train", "compress", "eval", "sweep", "compare"):
        add_config_verb(sub, verb, _HELP[verb])
    from . import demo
    demo.add_arguments(sub.add_parser("demo", help="LeNet-5 on Fashion-MNIST: train, compress, deploy"))
    args = parser.parse_args(argv)

    def action():
        if args.command == "demo":
            return demo.run(args)
        from . import commands
        opts, resume = overrides_and_resume(args)
        return commands.main(args.command, args.config, opts, resume)

    return run_entry_point("classification", action)


if __name__ == "__main__":
    sys.exit(main())
