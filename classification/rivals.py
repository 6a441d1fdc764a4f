"""Stage 3 of `compare` (classification/compare.py): the rivals self-grouping is measured against,
pruned to the same budget and fine-tuned on the engine's Trainer with the same schedule as the SG
run (the same pruning steps, the same local epochs after each, the same global epochs).

* ``Unstructured``: L1 magnitude pruning with ``torch.nn.utils.prune`` of the layers SG compresses
  (global: one ranking over all of them; layer: every layer to the same fraction). Counted with
  only its surviving weights (params) and their multiply-accumulates (FLOPs).
* ``Channel``: structured channel pruning with Torch-Pruning's ``MagnitudePruner`` (L1 importance,
  its DepGraph keeps coupled layers consistent); the output layer is left whole. The result is a
  smaller dense network. Its pruning ratio is searched on copies of the baseline so that the
  smaller network meets the budget.

Both are counted by the suite's one counter (``sgdet.count``). A rival sub-run has no mid-run
checkpoint: an interrupted one starts over; a finished one (``rival.json``) is kept by --resume."""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os

import torch
from torch import nn

import sgdet
from sgdet.checkpoint import read
from sgdet.compress import compressible_layers
from sgdet.engine.checkpointing import fresh_state
from sgdet.engine.reporting import METRICS, RESULTS
from sgdet.engine.rng import seed_everything
from sgdet.engine.trainer import Trainer
from sgdet.errors import ConfigError
from sgdet.files import write_json

log = logging.getLogger("classification")

RESULT = "rival.json"


# ---------------------------------------------------------------------------- unstructured

def _mask_of(module: nn.Module) -> torch.Tensor:
    mask = getattr(module, "weight_mask", None)
    return mask if mask is not None else (module.weight != 0)


def _surviving_macs(module: nn.Module, inputs, output) -> int:
    """The counter's formula for a conv or linear layer with only its surviving weights."""
    kept = int(_mask_of(module).sum())
    if isinstance(module, nn.Conv2d):
        return int(output[0, 0].numel()) * output.shape[0] * kept
    return int(output.numel() // module.out_features) * kept


@contextlib.contextmanager
def _counting_survivors(layers):
    """Give each layer the ``sg_macs`` hook the counter asks layers that know their own cost."""
    for m in layers:
        m.sg_macs = functools.partial(_surviving_macs, m)
    try:
        yield
    finally:
        for m in layers:
            del m.sg_macs


def _positions(model: nn.Module, layers: list[nn.Module], input_size) -> list[int]:
    """Multiply-accumulates per weight of each layer for one example (conv: output positions)."""
    found = {}

    def hook(module, inputs, output):
        found[module] = (int(output[0, 0].numel()) if isinstance(module, nn.Conv2d)
                         else int(output[0].numel() // module.out_features))
    handles = [m.register_forward_hook(hook) for m in layers]
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return [found[m] for m in layers]


class Unstructured:
    """Iterative L1 magnitude pruning of the SG layers to ``target`` pruned params (or MACs)."""

    name = "unstructured"

    def __init__(self, cfg, budget: str, target: float, scope: str) -> None:
        self.cfg, self.budget, self.target, self.scope = cfg, budget, float(target), scope
        self.layers: list[nn.Module] = []
        self.cost: list[int] = []

    def label(self, arch_label: str) -> str:
        return f"{arch_label} unstructured ({self.scope} L1)"

    def start(self, model: nn.Module, input_size, fractions: list[float], device) -> None:
        chosen = compressible_layers(model, list(self.cfg.SG.INCLUDE), list(self.cfg.SG.EXCLUDE))
        self.layers = [m for _, m in chosen]
        if not self.layers:
            raise ConfigError("the model has no compressible Conv2d/Linear layers")
        self.cost = ([1] * len(self.layers) if self.budget == "params"
                     else _positions(model, self.layers, input_size))
        total = sum(c * m.weight.numel() for c, m in zip(self.cost, self.layers))
        if self.target > total:
            raise ConfigError(f"unstructured pruning cannot remove {self.target:.0f} {self.budget}: its "
                              f"layers hold only {total}; lower COMPARE.RATIOS")

    def _pruned(self) -> list[int]:
        return [int((~_mask_of(m).bool()).sum()) for m in self.layers]

    @torch.no_grad()
    def step(self, model: nn.Module, fraction: float) -> None:
        """Prune up to ``fraction`` of the target (cumulative)."""
        from torch.nn.utils import prune
        goal = self.target * fraction
        for m in self.layers:          # training moved weight_orig since the last forward
            if hasattr(m, "weight_mask"):
                m.weight = m.weight_orig * m.weight_mask
        pruned = self._pruned()
        if self.scope == "layer":
            total = sum(c * m.weight.numel() for c, m in zip(self.cost, self.layers))
            share = goal / total
            for m, done in zip(self.layers, pruned):
                prune.l1_unstructured(m, "weight", amount=max(round(share * m.weight.numel()) - done, 0))
            return
        # global: the smallest surviving magnitudes network-wide, as many as reach the goal
        done = sum(c * n for c, n in zip(self.cost, pruned))
        magnitudes = torch.cat([torch.where(_mask_of(m).bool(), m.weight.abs(), torch.inf).flatten().cpu()
                                for m in self.layers])
        costs = torch.cat([torch.full((m.weight.numel(),), float(c)) for c, m in zip(self.cost, self.layers)])
        order = torch.argsort(magnitudes, stable=True)[: int(torch.isfinite(magnitudes).sum())]
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(costs[order].double(), 0)])
        amount = int(torch.argmin((cumulative - (goal - done)).abs()))
        prune.global_unstructured([(m, "weight") for m in self.layers],
                                  pruning_method=prune.L1Unstructured, amount=amount)

    def counts(self, model: nn.Module, input_size) -> dict:
        with _counting_survivors(self.layers):
            counts = sgdet.count(model, input_size)
        counts["params"] -= sum(self._pruned())    # the counter sees weight_orig whole
        return counts

    def finish(self, model: nn.Module) -> None:
        """Make the masks permanent: a dense network with zeros (its deployed form)."""
        from torch.nn.utils import prune
        for m in self.layers:
            if hasattr(m, "weight_mask"):
                prune.remove(m, "weight")


# --------------------------------------------------------------------------------- channel

def output_layer(model: nn.Module) -> nn.Module:
    """The layer producing the logits (the last Linear, else the last Conv2d): kept whole."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)] or \
        [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return last[-1]


def torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError("COMPARE.METHODS channel needs Torch-Pruning: pip install torch-pruning "
                          "(make setup installs it)") from None
    return tp


class Channel:
    """Torch-Pruning's MagnitudePruner (L1), iterated over the steps, to ``target`` kept params
    (or MACs) of the smaller dense network."""

    name = "channel"
    SEARCH = 16            # bisection steps of the uniform ratio

    def __init__(self, cfg, budget: str, target: float, tolerance: float, base: dict) -> None:
        self.budget, self.target, self.tolerance, self.base = budget, float(target), tolerance, base
        self.ratio, self.per_layer = 0.0, {}
        self.pruner = None

    def label(self, arch_label: str) -> str:
        return f"{arch_label} channel (Torch-Pruning L1)"

    def _pruner(self, model, example, ratio, per_layer, fractions=None):
        tp = torch_pruning()
        kwargs = {}
        if fractions is not None:
            kwargs.update(iterative_steps=len(fractions),
                          iterative_pruning_ratio_scheduler=lambda r, steps: [r * f for f in [0.0, *fractions]])
        return tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
            pruning_ratio_dict={model.get_submodule(n): r for n, r in per_layer.items()} or None,
            ignored_layers=[output_layer(model)], global_pruning=False, **kwargs)

    def _kept(self, model, input_size, ratio, per_layer) -> float:
        trial = copy.deepcopy(model).cpu().eval()
        self._pruner(trial, torch.zeros(1, *input_size), ratio, per_layer).step()
        return float(sgdet.count(trial, input_size)[self.budget])

    def _bisect(self, kept_of, lo=0.0, hi=0.99) -> tuple[float, float]:
        """The ratio in [lo, hi] whose kept count is closest to the target (kept falls as it grows)."""
        best = (lo, kept_of(lo))
        for _ in range(self.SEARCH):
            mid = (lo + hi) / 2
            kept = kept_of(mid)
            if abs(kept - self.target) < abs(best[1] - self.target):
                best = (mid, kept)
            if abs(kept - self.target) <= self.tolerance * self.base[self.budget] / 4:
                break
            lo, hi = (mid, hi) if kept > self.target else (lo, mid)
        return best

    def plan(self, model: nn.Module, input_size) -> None:
        """Search the uniform channel ratio meeting the budget; where channels are too coarse for
        the tolerance, then the ratio of the single layer that gets closest."""
        ratio, kept = self._bisect(lambda r: self._kept(model, input_size, r, {}))
        per_layer: dict = {}
        off = abs(kept - self.target) / self.base[self.budget]
        if off > self.tolerance / 2:
            last = output_layer(model)
            tp_layers = [(n, m) for n, m in model.named_modules()
                         if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not last]
            tp_layers.sort(key=lambda nm: -nm[1].weight.numel())
            for name, _ in tp_layers[:3]:
                r, k = self._bisect(lambda v: self._kept(model, input_size, ratio, {name: v}))
                if abs(k - self.target) < abs(kept - self.target):
                    per_layer, kept = {name: r}, k
        self.ratio, self.per_layer = ratio, per_layer
        log.info("channel pruning plan: ratio %.4f%s -> %.0f kept %s (target %.0f)", ratio,
                 f", {per_layer}" if per_layer else "", kept, self.budget, self.target)

    def start(self, model: nn.Module, input_size, fractions: list[float], device) -> None:
        example = torch.zeros(1, *input_size, device=device)
        self.pruner = self._pruner(model, example, self.ratio, self.per_layer, fractions)

    def step(self, model: nn.Module, fraction: float) -> None:
        self.pruner.step()

    def counts(self, model: nn.Module, input_size) -> dict:
        return sgdet.count(model, input_size)

    def finish(self, model: nn.Module) -> None:
        """No longer the registered architecture: saved without its name, reloaded by shrinking."""
        self.pruner = None
        if hasattr(model, "sgdet_arch"):
            del model.sgdet_arch


def shrink_to(model: nn.Module, state: dict) -> nn.Module:
    """Replace each Conv2d, Linear and BatchNorm2d of ``model`` by one of the width its
    ``state`` entries have (a channel-pruned network rebuilt from its skeleton)."""
    for name, m in list(model.named_modules()):
        w = state.get(f"{name}.weight")
        if w is None or not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or w.shape == m.weight.shape:
            continue
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(w.shape[1] * m.groups, w.shape[0], m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups, m.bias is not None, m.padding_mode)
        elif isinstance(m, nn.Linear):
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        else:
            new = nn.BatchNorm2d(w.shape[0], m.eps, m.momentum, m.affine, m.track_running_stats)
        model.set_submodule(name, new)
    return model


# ------------------------------------------------------------------------------ the runs

class RivalTrainer(Trainer):
    """The engine's Trainer running a rival: ``method``'s pruning at each of the SG schedule's
    steps (``fractions`` of the budget), the same local and global fine-tuning, the same reports.
    No mid-run checkpoint (a pruned structure the checkpoint format cannot name)."""

    def __init__(self, *args, method=None, **kwargs) -> None:
        self.method = method
        super().__init__(*args, **kwargs)

    def save_checkpoint(self, optimizer=None, scheduler=None) -> None:
        """An interrupted rival starts over; nothing to resume from."""

    def counts(self) -> dict:
        return self.method.counts(self.model, self.input_size)

    def run(self, fractions: list[float], local_epochs: int, global_epochs: int, epochs: str) -> dict:
        cfg, method = self.cfg, self.method
        s = self.state = fresh_state("rival")
        seed_everything(self.hp["seed"])
        self.reporter.rewind({METRICS: 0, RESULTS: 0}, 0)        # a rival starts over
        if (local_epochs or global_epochs) and self.train_loader is None:
            raise ConfigError("the rivals fine-tune and need a training set")
        base = self._record_base()
        method.start(self.model, self.input_size, fractions, self.device)
        local_lr = float(cfg.SG.LOCAL_LR)
        for t, fraction in enumerate(fractions, 1):
            method.step(self.model, fraction)
            self._place()
            self._wrap()
            counts = self.counts()
            log.info("%s step %d/%d: %s params, %s FLOPs", method.name, t, len(fractions),
                     counts["params"], counts["flops"])
            if local_epochs:
                optimizer = self._optimizer(local_lr)
                for e in range(local_epochs):
                    stats = self.train_epoch(optimizer, f"local t={t} {e + 1}/{local_epochs}")
                    s["epochs_seen"] += 1
                    self._log_epoch("local", stats, local_lr, None, t=t, epoch=e + 1, of=local_epochs)
            entry = {"step": t, "fraction": fraction, **counts,
                     "params_pruned": 1 - counts["params"] / base["params"],
                     "flops_pruned": 1 - counts["flops"] / base["flops"]}
            evaluation = self.evaluate(f"eval t={t}") if cfg.SG.EVAL_EACH_STEP else None
            if evaluation is not None:
                entry.update(top1=evaluation["top1"], top5=evaluation["top5"], loss=evaluation["loss"])
            s["steps"].append(entry)
            s["last_eval"] = evaluation
            self.reporter.metrics({"event": "step", **entry})
        s.update(phase="global", epoch=0)
        if global_epochs:
            self._global_phase(global_epochs)
        row = self._final_row(method.label(self.label), epochs)
        method.finish(self.model)
        row = self._finish(row)
        write_json(os.path.join(self.output_dir, RESULT),
                   {"row": row, "base": s["base"], "steps": s["steps"]}, indent=2)
        return row


def load_finished(folder: str, arch_model: nn.Module) -> tuple[nn.Module, dict] | None:
    """A finished rival sub-run's model and result (None when it did not finish)."""
    result, weights = os.path.join(folder, RESULT), os.path.join(folder, Trainer.final_name)
    if not (os.path.isfile(result) and os.path.isfile(weights)):
        return None
    with open(result) as handle:
        done = json.load(handle)
    state = read(weights)["state_dict"]
    model = sgdet.load(weights, model=shrink_to(copy.deepcopy(arch_model), state))
    log.info("kept the finished run in %s (%s)", folder, done["row"]["model"])
    return model, done
