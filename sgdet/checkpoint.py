"""The one checkpoint format of the suite: tensors plus a plain description of the structure.

A file is a dict of plain types and tensors (loadable with ``torch.load(weights_only=True)``):
``format``/``version``, ``arch`` (registered builder and its kwargs), ``form`` (dense, masked or
deployed), ``modules`` (for every SG or deployed module: its type, constructor arguments and a
summary of groups and kept channels), ``state_dict`` and free-form ``meta``. No pickled modules.
Writes go to a temporary file that is renamed into place, so a crash never leaves half a file.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch
from torch import nn

from .deploy import DiverseGroupConv2d, DiverseGroupLinear, GatheredBatchNorm2d
from .deploy.dense_parts import ChannelsLastMaxPool2d, FoldedConv2d
from .deploy.fusion import relink
from .deploy.modules import FoldedBatchNorm2d
from .errors import CheckpointError, ConfigError
from .files import torch_save
from .layers import SGConv2d, SGLinear, is_sg_layer
from .models import arch_of, build

FORMAT = "sgdet-checkpoint"
VERSION = 1
_TYPES = {cls.__name__: cls for cls in (SGConv2d, SGLinear, DiverseGroupConv2d, DiverseGroupLinear,
                                        GatheredBatchNorm2d, FoldedBatchNorm2d, FoldedConv2d,
                                        ChannelsLastMaxPool2d)}


def layer_summary(module: nn.Module) -> dict:
    """Groups, group sizes, kept input channels per group and pruned fraction of one layer."""
    if is_sg_layer(module):
        keep = module.group_keep()
        return {"groups": module.num_groups, "group_sizes": module.group_sizes().tolist(),
                "kept_inputs": keep.sum(1).tolist(), "in_features": int(module.mask.shape[1]),
                "out_features": int(module.mask.shape[0]), "pruned": module.pruned_fraction()}
    if isinstance(module, (DiverseGroupConv2d, DiverseGroupLinear)):
        return {"groups": len(module.group_out), "group_sizes": list(module.group_out),
                "kept_inputs": list(module.group_in), "in_features": module.source_in,
                "out_features": module.out_features_total, "pruned": module.pruned_fraction()}
    return {}


def _structure(module: nn.Module) -> dict:
    if isinstance(module, SGConv2d):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "bias": module.bias is not None}
    if isinstance(module, SGLinear):
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    return module.structure()


def describe(model: nn.Module) -> dict[str, dict]:
    return {name: {"type": type(m).__name__, "structure": _structure(m), "summary": layer_summary(m)}
            for name, m in model.named_modules() if isinstance(m, tuple(_TYPES.values()))}


def form_of(model: nn.Module) -> str:
    kinds = {type(m) for m in model.modules()}
    if kinds & {DiverseGroupConv2d, DiverseGroupLinear}:
        return "deployed"
    return "masked" if kinds & {SGConv2d, SGLinear} else "dense"


def plain(value: Any, where: str = "meta") -> Any:
    """``value`` as the plain types torch.load(weights_only=True) accepts: numpy scalars become
    Python numbers, paths strings, tuples lists; anything else is a ConfigError."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    for kind in (bool, int, float, str):     # exact builtins: np.float64 subclasses float
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, dict):
        return {str(k): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():   # numpy scalar
        return value.item()
    raise ConfigError(f"{where} holds a {type(value).__name__}, which a checkpoint cannot store")


def save(model: nn.Module, path: str | os.PathLike, meta: dict | None = None,
         extra: dict | None = None) -> None:
    """Write ``model`` (dense, masked or deployed) as an sgdet checkpoint. ``extra``: further
    top-level entries of plain types and tensors (the Trainer's ``train_state``), kept by
    ``read`` and ignored by ``load``."""
    if os.path.isdir(path):
        raise ConfigError(f"cannot write checkpoint {os.fspath(path)}: it is a directory")
    payload = {
        "format": FORMAT, "version": VERSION, "arch": arch_of(model), "form": form_of(model),
        "modules": describe(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": plain(dict(meta or getattr(model, "sgdet_meta", None) or {})),
    }
    for key, value in (extra or {}).items():
        if key in payload:
            raise ConfigError(f"checkpoint entry {key!r} is reserved")
        payload[key] = value
    torch_save(payload, path)


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, the one way the suite reads a torch file
    (sgdet checkpoints here, dense state dicts in ``models.load_dense_weights``). A file torch
    refuses (pickled modules or classes: sgdet never unpickles code) or cannot read (truncated,
    corrupt, not a torch file) is a CheckpointError in one line, "<path> is not a safe sgdet
    checkpoint (...)", never torch's advice on how to unpickle it."""
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise                          # missing, a directory, no permission: said as such
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found or "Weights only load failed. This file can still be loaded" in str(exc):
            what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
            reason = (f"it holds {what}, and sgdet never unpickles code; save the model with "
                      "sgdet.save, or its state_dict() with torch.save")
        else:
            reason = "not a torch file, or a truncated or corrupt one"
    except Exception as exc:           # noqa: BLE001 - torch raises RuntimeError, EOFError, ...
        first = _ESCAPE.sub("", str(exc)).strip().splitlines()
        first = first[0].split(". ")[0].rstrip(".") if first else ""
        reason = "truncated or corrupt" + (f": {first}" if first else "")
    raise CheckpointError(f"{path} is not a safe sgdet checkpoint ({reason})") from None


def peek(path: str | os.PathLike) -> dict | None:
    """The header of an sgdet checkpoint (``arch``, ``form``, ``meta``, ...: everything but the
    tensors), or None when ``path`` is no readable sgdet checkpoint. Never raises, never
    unpickles; for telling a checkpoint from a plain state dict before loading either."""
    try:
        blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        return None
    return {k: v for k, v in blob.items() if k not in ("state_dict", "train_state")}


def is_checkpoint(path: str | os.PathLike) -> bool:
    return peek(path) is not None


def read(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint file without building the model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an sgdet checkpoint (for a plain state dict use --weights)")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload['version']}; this sgdet reads up to {VERSION}")
    for key in ("modules", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path} is damaged: '{key}' is missing")
    return payload


def _rebuild_module(name: str, entry: dict, current: nn.Module | None) -> nn.Module:
    kind, structure = entry.get("type"), dict(entry.get("structure") or {})
    cls = _TYPES.get(kind)
    if cls is None:
        raise CheckpointError(f"unknown module type {kind!r} for layer {name!r}")
    if cls in (SGConv2d, SGLinear):
        dense_type = nn.Conv2d if cls is SGConv2d else nn.Linear
        if not isinstance(current, dense_type):
            raise CheckpointError(f"layer {name!r} of the model is not a {dense_type.__name__}")
        return cls.from_dense(current)
    return cls(**structure)


def load(path: str | os.PathLike, model: nn.Module | None = None,
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path``: the registered architecture it names (or the given
    dense ``model`` skeleton), with its SG or deployed layers and all tensors restored."""
    payload = read(path)
    arch = payload.get("arch")
    if model is None:
        if not arch:
            raise CheckpointError(f"{path} names no registered architecture; pass model= to load it")
        model = build(arch["name"], **dict(arch.get("kwargs") or {}))
    try:
        for name, entry in payload["modules"].items():
            try:
                current = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{path} has a layer {name!r} that the model lacks") from None
            model.set_submodule(name, _rebuild_module(name, entry, current))
        model.load_state_dict(payload["state_dict"], strict=True)
        relink(model)                  # folded BNs and fused blocks point at their convs again
    except CheckpointError:
        raise
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path} does not fit the model: {message}") from None
    for name, m in model.named_modules():
        if is_sg_layer(m) and not m.check_invariant():
            raise CheckpointError(f"{path} is damaged: layer {name!r} breaks the group invariant")
    model.sgdet_meta = dict(payload.get("meta") or {})
    if arch:
        model.sgdet_arch = arch
    return model.to(map_location)
