"""Stage 1 of the classification pipeline: the network a run trains or compresses. The registered
MODEL.ARCH built for the data's classes and input channels, with MODEL.WEIGHTS loaded (a dense
``.pth`` or any sgdet checkpoint), and its name in the paper's tables."""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from torch import nn

import sgdet
from sgdet.checkpoint import peek
from sgdet.errors import CheckpointError, ConfigError

log = logging.getLogger("classification")


def _outputs(model: nn.Module) -> int | None:
    heads = [m for m in model.modules() if isinstance(getattr(m, "out_features", None), int)]
    return heads[-1].out_features if heads else None


def _load_checkpoint(cfg, path: str, header: dict, model: nn.Module, num_classes: int,
                     follow_arch: bool) -> nn.Module:
    """The sgdet checkpoint at ``path``, rebuilt as the network it names. A checkpoint of another
    architecture than MODEL.ARCH is followed where ``follow_arch`` (eval: the file says what it
    holds, as transfer's does) and an error otherwise; a classifier or input width other than
    the data's is an error naming both, not a state-dict dump."""
    name = (header.get("arch") or {}).get("name")
    if not name:                       # a checkpoint of an unregistered network: MODEL.ARCH's shape
        return sgdet.load(path, model=model)
    if name != cfg.MODEL.ARCH:
        if not follow_arch:
            raise ConfigError(f"MODEL.WEIGHTS {path} holds a {name}, but MODEL.ARCH is "
                              f"{cfg.MODEL.ARCH}; set MODEL.ARCH {name}")
        log.info("%s holds a %s: evaluating that (MODEL.ARCH %s is for dense files)", path, name,
                 cfg.MODEL.ARCH)
    channels = (header["arch"].get("kwargs") or {}).get("in_channels")
    if channels is not None and int(channels) != int(cfg.MODEL.INPUT_SIZE[0]):
        raise ConfigError(f"MODEL.WEIGHTS {path} is a {name} for {channels}-channel input, but "
                          f"MODEL.INPUT_SIZE is {list(cfg.MODEL.INPUT_SIZE)}")
    loaded = sgdet.load(path)
    outputs = _outputs(loaded)
    if outputs is not None and outputs != num_classes:
        raise ConfigError(f"MODEL.WEIGHTS {path} has a {outputs}-way classifier, but the data has "
                          f"{num_classes} classes")
    return loaded


def build_model(cfg, num_classes: int, follow_arch: bool = False) -> tuple[nn.Module, dict]:
    """The registered MODEL.ARCH with ``num_classes`` outputs (and INPUT_SIZE[0] input channels if
    the builder takes ``in_channels``), with MODEL.WEIGHTS loaded: a dense state dict (``.pth``)
    or an sgdet checkpoint (dense or masked), in the architecture the checkpoint names where
    ``follow_arch`` (eval). Returns the model and the checkpoint's meta."""
    builder = sgdet.ARCHITECTURES.get(cfg.MODEL.ARCH)
    if builder is None:
        raise ConfigError(f"unknown MODEL.ARCH {cfg.MODEL.ARCH!r}; choose from: "
                          f"{', '.join(sorted(sgdet.ARCHITECTURES))}")
    kwargs: dict[str, Any] = {"num_classes": int(num_classes)}
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        params = {}
    if "in_channels" in params:
        kwargs["in_channels"] = int(cfg.MODEL.INPUT_SIZE[0])
    model = sgdet.build(cfg.MODEL.ARCH, **kwargs)
    meta: dict = {}
    path = str(cfg.MODEL.WEIGHTS or "")
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"MODEL.WEIGHTS not found: {path}")
        header = peek(path)
        if header is not None:
            model = _load_checkpoint(cfg, path, header, model, int(num_classes), follow_arch)
            meta = dict(getattr(model, "sgdet_meta", None) or {})
        else:
            sgdet.load_dense_weights(model, path)
        log.info("loaded weights %s", path)
    return model, meta
