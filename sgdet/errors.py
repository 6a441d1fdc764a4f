"""Error types of the SG-CNN suite: every user-facing failure is one of these, so entry points can
print one line and exit 2 instead of a traceback."""


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


def run_entry_point(prog: str, action) -> int:
    """Run ``action()`` for a command-line program: user errors and OS errors become one line on
    stderr and exit status 2, Ctrl-C exits 130; anything else is a bug and keeps its traceback."""
    import sys
    try:
        action()
    except SGError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:             # unwritable output, full disk, permissions
        detail = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        print(f"{prog}: error: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
