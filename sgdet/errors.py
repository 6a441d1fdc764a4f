"""Error types of the SG-CNN suite: every user-facing failure is one of these, so entry points can
print one line and exit 2 instead of a traceback. Also the one voice of every command line:
``ArgumentParser`` (argument errors as ``PROG: error: ...``, one line) and ``run_entry_point``."""
import argparse
import os
import sys


class SGError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class ConfigError(SGError, ValueError):
    """A wrong argument value: a ratio outside [0, 1), groups < 1, an unknown architecture."""


class CheckpointError(SGError):
    """A checkpoint that is missing, truncated, corrupt or not an sgdet checkpoint."""


class DatasetError(SGError):
    """A dataset folder or file that is missing or laid out wrongly."""


class DependencyError(SGError):
    """An optional package a verb needs (onnx, onnxruntime for ONNX export) is not installed."""


class NumericalError(SGError, ValueError):
    """NaN or inf weights in a layer that is about to be grouped."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the suite's voice: a bad argument is one line, ``VOICE: error: MESSAGE (see
    'PROG --help')`` on stderr, exit status 2 (argparse's own form prints a usage block under a
    different prefix). ``voice``: the name the entry point's other errors use (``sgdet``,
    ``classification``, ...); sub-command parsers inherit it."""

    def __init__(self, *args, voice: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.voice = voice or self.prog

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", lambda **kw: type(self)(voice=self.voice, **kw))
        return super().add_subparsers(**kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.voice}: error: {message} (see '{self.prog} --help')\n")


def _stdout_is_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (``sgdet info ... | head -1``)."""
    try:
        import select
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):      # no poll (Windows), stdout closed/replaced
        return True


def run_entry_point(prog: str, action) -> int:
    """Run ``action()`` for a command-line program: user errors and OS errors become one line on
    stderr and exit status 2, Ctrl-C exits 130, a closed stdout pipe (``| head``) ends quietly
    with 141 as SIGPIPE would; anything else is a bug and keeps its traceback."""
    try:
        action()
        sys.stdout.flush()             # a closed pipe shows here, not in the interpreter's exit
    except SGError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError as exc:
        if not _stdout_is_gone():
            print(f"{prog}: error: {exc.strerror or exc}", file=sys.stderr)
            return 2
        devnull = os.open(os.devnull, os.O_WRONLY)     # the interpreter's final flush goes there
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:             # unwritable output, full disk, permissions
        detail = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        print(f"{prog}: error: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
