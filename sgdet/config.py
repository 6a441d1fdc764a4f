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
        _check_base_chain(path)
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


def _check_base_chain(path: str, chain: tuple[str, ...] = ()) -> None:
    """Every file of ``path``'s ``_BASE_`` chain is a YAML mapping and no file bases on itself
    (fvcore would recurse until RecursionError, or fail on a plain string with AttributeError)."""
    real = os.path.realpath(path)
    if real in chain:
        names = " -> ".join(os.path.basename(p) for p in (*chain[chain.index(real):], real))
        raise ConfigError(f"{path}: _BASE_ cycle ({names})")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}" + (f" (the _BASE_ of {chain[-1]})" if chain else ""))
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc.__class__.__name__}") from None
    if content is None:
        return
    if not isinstance(content, dict):
        raise ConfigError(f"{path} holds a YAML {type(content).__name__}, not a mapping of config keys")
    base = content.get("_BASE_")
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _BASE_ must be a file path, got {base!r}")
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(path), base)
        _check_base_chain(base, (*chain, real))


def _explain(exc: Exception) -> str:
    text = " ".join(str(exc).strip("'\"").split())
    if "Non-existent" in text:
        key = text.split(":", 1)[-1].strip()
        return f"unknown config key {key}"
    return text[:300] or type(exc).__name__


def save_config(cfg: CfgNode, folder: str, name: str = "config.yaml") -> str:
    """Write the merged config as YAML into ``folder`` (temporary file, then rename)."""
    return write_text(os.path.join(folder, name), cfg.dump())
