"""Entry point: `python -m classification demo [...]`. Thin: parses arguments and calls the
pipeline; user errors print one line and exit 2."""
import argparse
import sys

from sgdet.errors import run_entry_point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m classification")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo
    demo.add_arguments(sub.add_parser("demo", help="LeNet-5 on Fashion-MNIST: train, compress, deploy"))
    args = parser.parse_args(argv)
    commands = {"demo": demo.run}
    return run_entry_point("classification", lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
