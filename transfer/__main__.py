"""Entry point: ``python -m transfer VERB ...`` (or ``torchrun ... -m transfer VERB``).

    finetune --config FILE [--resume] [KEY VALUE ...]       dense head + fine-tuning on CUB-200
    eval     --config FILE [KEY VALUE ...]                  top-1/top-5, Params, FLOPs on the test split
    table    --config FILE --checkpoints A [B ...] [--out DIR] [--resume] [KEY VALUE ...]   Table 5
    example  [--out DIR] [--data DIR]                       Fashion-MNIST -> sklearn digits on a CPU

Thin: parses arguments and calls the pipeline; user errors print one line and exit 2."""
import os
import re
import sys

from sgdet.engine.cli import add_config_verb, overrides_and_resume
from sgdet.errors import ArgumentParser, run_entry_point

_HELP = {"finetune": "replace the classifier by a dense head and fine-tune MODEL.WEIGHTS on CUB-200-2011",
         "eval": "evaluate a fine-tuned model: top-1/top-5, Params, FLOPs",
         "table": "fine-tune every checkpoint with one config and write Table 5 (md, json, png)"}


def _table_arguments(p) -> None:
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="FILE",
                   help="ImageNet checkpoints: sgdet .sg.pt (L, G, LG, deployed) or dense .pth")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where table.md/json/png go (default: OUTPUT_DIR)")


_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*$")


def split_checkpoints(checkpoints: list[str]) -> tuple[list[str], list[str]]:
    """``--checkpoints a.pt b.pt DATA.ROOT /x``: argparse hands the overrides to --checkpoints
    too; the first upper-case config key that is not a file starts the overrides."""
    for i, item in enumerate(checkpoints):
        if _KEY.match(item) and not os.path.exists(item):
            return checkpoints[:i], checkpoints[i:]
    return checkpoints, []


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m transfer", voice="transfer")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in ("finetune", "eval", "table"):
        add_config_verb(sub, verb, _HELP[verb], "DATA.ROOT /data/CUB_200_2011 SOLVER.LR 0.01",
                        extra=_table_arguments if verb == "table" else None)
    from . import example
    example.add_arguments(sub.add_parser("example", help="a compressed LeNet-5 (Fashion-MNIST) "
                                         "adapted to scikit-learn's digits, end to end on a CPU"))
    args = parser.parse_args(argv)

    def action():
        if args.command == "example":
            return example.run(args)
        from . import commands
        opts, resume = overrides_and_resume(args)
        checkpoints = getattr(args, "checkpoints", None)
        if checkpoints is not None:
            checkpoints, more = split_checkpoints(list(checkpoints))
            opts = more + opts
        return commands.main(args.command, args.config, opts, resume, checkpoints,
                             getattr(args, "out", None))

    return run_entry_point("transfer", action)


if __name__ == "__main__":
    sys.exit(main())
