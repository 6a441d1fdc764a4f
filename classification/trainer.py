"""The training loop shared by the pipelines: one epoch of SGD with progress, top-1/top-5
evaluation, and local/global fine-tuning helpers that keep pruned connections at zero."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import sgdet


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scheduler=None, device: str | torch.device = "cpu", max_steps: int | None = None,
                    desc: str = "train", progress: bool = True) -> dict:
    """One pass (or ``max_steps`` batches) over ``loader``; returns mean loss and accuracy."""
    model.train()
    total = math.inf if max_steps is None else max_steps
    batches = itertools.islice(loader, max_steps) if max_steps is not None else loader
    seen, loss_sum, correct = 0, 0.0, 0
    bar = tqdm(batches, total=min(total, len(loader)), desc=desc, leave=False, disable=not progress,
               dynamic_ncols=True)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        seen += labels.numel()
        loss_sum += loss.item() * labels.numel()
        correct += int((logits.argmax(1) == labels).sum())
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
    keep_pruned_zero(model)
    return {"loss": loss_sum / max(seen, 1), "top1": 100.0 * correct / max(seen, 1)}


@torch.no_grad()
def keep_pruned_zero(model: nn.Module) -> None:
    """Weight decay and momentum never move a masked weight (its gradient is zero and it is
    zero), but a resumed or externally edited model may: re-apply every mask."""
    for m in model.modules():
        if sgdet.layers.is_sg_layer(m):
            m.zero_pruned_()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str | torch.device = "cpu",
             desc: str = "eval", progress: bool = True) -> dict:
    """Top-1 and top-5 accuracy (%) and mean loss over ``loader``."""
    model.eval()
    seen, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels.unsqueeze(1)).any(1).sum())
        seen += labels.numel()
    return {"loss": loss_sum / max(seen, 1), "top1": 100.0 * top1 / max(seen, 1),
            "top5": 100.0 * top5 / max(seen, 1)}


def fit(model: nn.Module, train_loader, epochs: int, lr: float, device="cpu", momentum: float = 0.9,
        weight_decay: float = 1e-4, desc: str = "train", progress: bool = True,
        max_steps_per_epoch: int | None = None) -> list[dict]:
    """SGD with a cosine learning-rate schedule over ``epochs``; returns per-epoch stats."""
    optimizer = make_optimizer(model, lr, momentum, weight_decay)
    steps = epochs * (max_steps_per_epoch or len(train_loader))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    history = []
    for epoch in range(epochs):
        history.append(train_one_epoch(model, train_loader, optimizer, scheduler, device,
                                       max_steps_per_epoch, f"{desc} {epoch + 1}/{epochs}", progress))
    return history


def local_finetune_hook(train_loader, lr: float, steps: int, device="cpu", progress: bool = True):
    """The local fine-tuning of Algorithm 1 (line 12): ``steps`` batches at a constant ``lr``
    after each pruning step; pass it as ``sgdet.compress(..., finetune=hook)``."""
    def hook(model: nn.Module, t: int) -> None:
        optimizer = make_optimizer(model, lr)
        train_one_epoch(model, train_loader, optimizer, None, device, steps, f"local t={t}", progress)
    return hook
