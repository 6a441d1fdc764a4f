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


class NumericalError(SGError, ValueError):
    """NaN or inf weights in a layer that is about to be grouped."""
