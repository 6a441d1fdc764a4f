"""The one config system of the suite: detectron2-style YAML (upper-case keys, ``_BASE_``
inheritance) on fvcore's CfgNode, with trailing ``KEY VALUE`` overrides. Unknown keys, bad
values and unreadable files become one-line ConfigErrors; the merged config is saved beside the
results with an atomic write."""
from __future__ import annotations

import os

import yaml
from fvcore.common.config import CfgNode

from .errors import ConfigError
from .files import write_text

__all__ = ["CfgNode", "load_config", "save_config"]


def load_config(defaults: CfgNode, path: str | None = None, overrides: list[str] | None = None
                ) -> CfgNode:
    """A frozen copy of ``defaults`` merged with the YAML at ``path`` (and its ``_BASE_`` chain)
    and then with ``overrides`` (``["SOLVER.LR", "0.1", ...]``)."""
    cfg = defaults.clone()
    cfg.set_new_allowed(False)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg.merge_from_file(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
        except (KeyError, AssertionError, ValueError, TypeError, FileNotFoundError) as exc:
            raise ConfigError(f"{path}: {_explain(exc)}") from None
    overrides = list(overrides or [])
    if len(overrides) % 2:
        raise ConfigError(f"overrides come in KEY VALUE pairs; {overrides[-1]!r} has no value")
    try:
        cfg.merge_from_list(overrides)
    except (KeyError, AssertionError, ValueError, TypeError) as exc:
        raise ConfigError(f"command-line override: {_explain(exc)}") from None
    cfg.freeze()
    return cfg


def _explain(exc: Exception) -> str:
    text = " ".join(str(exc).strip("'\"").split())
    if "Non-existent" in text:
        key = text.split(":", 1)[-1].strip()
        return f"unknown config key {key}"
    return text[:300] or type(exc).__name__


def save_config(cfg: CfgNode, folder: str, name: str = "config.yaml") -> str:
    """Write the merged config as YAML into ``folder`` (temporary file, then rename)."""
    return write_text(os.path.join(folder, name), cfg.dump())
