"""Stage 2 of the transfer pipeline: domain adaptation of a (compressed) ImageNet model. Load
MODEL.WEIGHTS (a masked L/G/LG sgdet checkpoint, a deployed one, or a dense torchvision .pth),
replace its classifier by a DENSE ``nn.Linear(in, NUM_CLASSES)`` and fine-tune everything else
with the classification pipeline's one Trainer (DDP, resume, logging, checkpoints). Every other
self-grouping layer keeps its groups and masks exactly: the Trainer never regroups outside
``compress`` and zeroes pruned weights after each epoch. This is how Table 5's Params come out:
the compressed network minus its (pruned) 1000-way head plus a dense 200-way one.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

import sgdet
from sgdet.engine.rng import seed_everything
from sgdet.engine.trainer import Trainer
from sgdet.models import pretty_arch
from sgdet.checkpoint import is_checkpoint, read
from sgdet.deploy import DiverseGroupLinear
from sgdet.errors import CheckpointError, ConfigError

log = logging.getLogger("transfer")

_HEAD_TYPES = (nn.Linear, DiverseGroupLinear)     # SGLinear is an nn.Linear


# ------------------------------------------------------------------------------------- models

def find_head(model: nn.Module) -> str:
    """Name of the classifier: ResNet ``fc``, DenseNet ``classifier``, otherwise the last
    Linear-like module (LeNet's ``classifier.3``, VGG's ``classifier.6``)."""
    names = dict(model.named_modules())
    for name in ("fc", "classifier"):
        if isinstance(names.get(name), _HEAD_TYPES):
            return name
    last = [n for n, m in names.items() if isinstance(m, _HEAD_TYPES)]
    if not last:
        raise ConfigError(f"{type(model).__name__} has no Linear classifier to replace")
    return last[-1]


def replace_head(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """Swap the classifier for a freshly initialised dense Linear with ``num_classes`` outputs
    (on the old head's device); the architecture tag follows so sgdet.save/load rebuild it."""
    name = find_head(model)
    old = model.get_submodule(name)
    head = nn.Linear(int(old.in_features), int(num_classes), bias=True)
    ref = next(old.parameters(), None)
    if ref is not None:
        head = head.to(ref.device)
    model.set_submodule(name, head)
    tag = getattr(model, "sgdet_arch", None)
    if isinstance(tag, dict) and "num_classes" in (tag.get("kwargs") or {}):
        model.sgdet_arch = {"name": tag["name"], "kwargs": {**tag["kwargs"], "num_classes": int(num_classes)}}
    return name, head


def load_source(cfg) -> tuple[nn.Module, dict]:
    """The ImageNet model of MODEL.WEIGHTS and its checkpoint meta. An sgdet checkpoint names its
    own architecture (so one table may mix ResNet and DenseNet files); a dense .pth is loaded
    into MODEL.ARCH with MODEL.SOURCE_CLASSES outputs. Empty WEIGHTS: a random MODEL.ARCH."""
    path = os.path.expanduser(str(cfg.MODEL.WEIGHTS or ""))
    kwargs = {"num_classes": int(cfg.MODEL.SOURCE_CLASSES)}
    if cfg.MODEL.ARCH == "lenet5":
        kwargs["in_channels"] = int(cfg.MODEL.INPUT_SIZE[0])
    if not path:
        log.warning("MODEL.WEIGHTS is empty: fine-tuning a randomly initialised %s", cfg.MODEL.ARCH)
        return sgdet.build(cfg.MODEL.ARCH, **kwargs), {}
    if not os.path.isfile(path):
        raise CheckpointError(f"MODEL.WEIGHTS not found: {path}")
    if is_checkpoint(path):
        payload = read(path)
        skeleton = None if payload.get("arch") else sgdet.build(cfg.MODEL.ARCH, **kwargs)
        model = sgdet.load(path, model=skeleton)
        meta = dict(getattr(model, "sgdet_meta", None) or {})
        meta.setdefault("form", payload.get("form"))
        arch = (payload.get("arch") or {}).get("name", cfg.MODEL.ARCH)
        if arch != cfg.MODEL.ARCH:
            log.info("%s holds a %s (MODEL.ARCH %s is used for dense files only)", path, arch, cfg.MODEL.ARCH)
    else:
        model = sgdet.build(cfg.MODEL.ARCH, **kwargs)
        sgdet.load_dense_weights(model, path)
        meta = {"form": "dense"}
    log.info("loaded %s (%s)", path, meta.get("form", "?"))
    return model, meta


def source_label(cfg, meta: dict, path: str) -> str:
    """The model's row name: the checkpoint's own label (``ResNet50-L (Conv-60/FC-60)``),
    ``<Arch> baseline`` for a dense file, else the file's stem."""
    label = str(meta.get("label") or "")
    if label:
        return label
    if meta.get("form") == "dense":
        arch = (meta.get("arch") or {}).get("name") if isinstance(meta.get("arch"), dict) else None
        return f"{pretty_arch(arch or cfg.MODEL.ARCH)} baseline"
    return stem(path) if path else f"{pretty_arch(cfg.MODEL.ARCH)} (random init)"


def stem(path: str) -> str:
    """``out/r50_lg60.sg.pt`` -> ``r50_lg60``: the checkpoint's folder name in a table run."""
    name = os.path.basename(str(path))
    for suffix in (".pt", ".pth", ".pth.tar", ".tar", ".sg"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def sg_structure(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (group, mask)} copies of every SG layer: what fine-tuning must leave unchanged."""
    return {n: (m.group.detach().cpu().clone(), m.mask.detach().cpu().clone())
            for n, m in sgdet.sg_layers(model).items()}


def prepare_model(cfg, num_classes: int) -> tuple[nn.Module, dict, str]:
    """Source model with its classifier replaced by a dense ``num_classes`` head; returns the
    model, the source meta and the row label."""
    seed_everything(int(cfg.SEED))       # the same new head on every rank
    model, meta = load_source(cfg)
    before = sgdet.count_params(model)
    name, head = replace_head(model, num_classes)
    log.info("replaced the classifier %r by a dense %d-way Linear (%d -> %d params in all); "
             "%d self-grouping layer(s) keep their groups and masks", name, num_classes, before,
             sgdet.count_params(model), len(sgdet.sg_layers(model)))
    return model, meta, source_label(cfg, meta, str(cfg.MODEL.WEIGHTS or ""))


# ------------------------------------------------------------------------------------ trainer

class TransferTrainer(Trainer):
    """The classification Trainer with two changes: the row is named after the source model (not
    "... baseline"), and unreadable images may be skipped (so DDP ranks agree on each step)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.may_skip = True

    def _final_row(self, label: str, epochs: str) -> dict:
        row = super()._final_row(self.label, epochs)
        row["model"] = self.label
        return row
