"""Engine stage: config value checks shared by every pipeline's schema (classification, transfer,
detection): each names the key and raises a one-line ConfigError."""
from __future__ import annotations

import math

from sgdet.counting import CONVENTIONS
from sgdet.errors import ConfigError


def positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def count_convention(value, key: str) -> str:
    """A counting convention of sgdet.count ("sgdet" or "paper")."""
    if value not in CONVENTIONS:
        raise ConfigError(f"{key} must be one of {', '.join(CONVENTIONS)}, got {value!r}")
    return value


def positive_float(value, key: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be a {'non-negative' if allow_zero else 'positive'} number, "
                          f"got {value!r}")
    return float(value)
