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
from sgdet.checkpoint import is_checkpoint
from sgdet.errors import CheckpointError, ConfigError

log = logging.getLogger("classification")


def build_model(cfg, num_classes: int) -> tuple[nn.Module, dict]:
    """The registered MODEL.ARCH with ``num_classes`` outputs (and INPUT_SIZE[0] input channels if
    the builder takes ``in_channels``), with MODEL.WEIGHTS loaded: a dense state dict (``.pth``)
    or an sgdet checkpoint (dense or masked). Returns the model and the checkpoint's meta."""
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
        if is_checkpoint(path):
            model = sgdet.load(path, model=model)
            meta = dict(getattr(model, "sgdet_meta", None) or {})
        else:
            sgdet.load_dense_weights(model, path)
        log.info("loaded weights %s", path)
    return model, meta
