"""Deployment, fast stage: turns an exactly deployed model (sgdet.deploy) into one that really
runs faster, with the same outputs to float32 rounding.

Three passes, all exact:
1. Permutation folding: where a deployed conv feeds another through a BatchNorm (and element-wise
   ops), its output is left in group order; the BN's parameters and the next conv's gather index
   are permuted instead, so no standalone reorder runs.
2. Dead channels: filters whose output no group of the next conv reads are dropped, with their
   BN channels (ResNet bottlenecks conv1->bn1->conv2->bn2->conv3, DenseNet conv1->norm2->conv2).
3. Execution plan per layer: groups merged into buckets of similar input sets (zero-filled),
   run as a loop of dense layers, as one padded grouped convolution, or as the dense layer over
   every input; chosen by timing the candidates interleaved on the layer's real input
   (``example_input``) or, without one, by a cost model. The dense form is always a candidate and
   is only replaced by a form faster by a margin, so noise cannot pick a slower layer.
4. Gathered BatchNorms (DenseNet's norm1, which selects the channels conv1 reads) become plain
   BNs over their whole input where the gather, a copy of a wide feature map, costs more than it
   saves.
"""
from __future__ import annotations

import copy
import random
import statistics
import time
from typing import Iterable

import torch
from torch import nn

from .deploy import _ELEMENTWISE, DiverseGroupConv2d, DiverseGroupLinear, GatheredBatchNorm2d, _set
from .errors import ConfigError

_DEPLOYED = (DiverseGroupConv2d, DiverseGroupLinear)

# {module class: [(producer conv, batch norm, consumer conv), ...]} where producer's output
# reaches consumer only through the BN and element-wise ops, and nothing else reads it.
CONV_BN_CONV_CHAINS: dict[type, list[tuple[str, str, str]]] = {}


def register_conv_bn_conv(cls: type, chains: Iterable[tuple[str, str, str]]) -> None:
    """Declare that in ``cls.forward`` conv a -> BN b -> (element-wise) -> conv c, and nothing
    else reads a's or b's output: sgdet.fast may then permute and shrink a and b freely."""
    CONV_BN_CONV_CHAINS[cls] = list(chains)


def _register_torchvision_chains() -> None:
    from torchvision.models import densenet, resnet
    register_conv_bn_conv(resnet.BasicBlock, [("conv1", "bn1", "conv2")])
    register_conv_bn_conv(resnet.Bottleneck, [("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")])
    register_conv_bn_conv(densenet._DenseLayer, [("conv1", "norm2", "conv2")])


def _sequential_chains(seq: nn.Sequential) -> list[tuple[str, str, str]]:
    names, mods = list(seq._modules), list(seq._modules.values())
    found = []
    for i in range(len(mods) - 2):
        if not isinstance(mods[i], DiverseGroupConv2d) or not isinstance(mods[i + 1], nn.BatchNorm2d):
            continue
        j = i + 2
        while j < len(mods) and isinstance(mods[j], _ELEMENTWISE):
            j += 1
        if j < len(mods) and isinstance(mods[j], DiverseGroupConv2d):
            found.append((names[i], names[i + 1], names[j]))
    return found


def conv_bn_conv_chains(model: nn.Module) -> list[tuple[str, str, str]]:
    """Fully-qualified (producer, bn, consumer) names where both convs are deployed."""
    if not CONV_BN_CONV_CHAINS:
        _register_torchvision_chains()
    found = []
    for prefix, module in model.named_modules():
        chains = CONV_BN_CONV_CHAINS.get(type(module))
        if chains is None and isinstance(module, nn.Sequential):
            chains = _sequential_chains(module)
        join = (prefix + ".") if prefix else ""
        for a, b, c in chains or ():
            p, bn, q = (getattr(module, n, None) for n in (a, b, c))
            if (isinstance(p, DiverseGroupConv2d) and isinstance(q, DiverseGroupConv2d)
                    and isinstance(bn, nn.BatchNorm2d)
                    and getattr(bn, "in_channels", bn.num_features) == p.out_channels):
                found.append((join + a, join + b, join + c))
    return found


def _gathers(bn: nn.Module) -> bool:
    return isinstance(bn, GatheredBatchNorm2d) and not bn._identity


# --- pass 1: permutation folding ---------------------------------------------------------------

@torch.no_grad()
def fold_permutation(producer: DiverseGroupConv2d, bn: nn.BatchNorm2d, consumer: DiverseGroupConv2d) -> bool:
    """Let ``producer`` emit its channels in group order; permute ``bn`` and ``consumer`` instead."""
    if not producer._reorder:
        return False
    out_order = producer.out_order                   # original channel -> position in group order
    if _gathers(bn):
        bn.channel_index.copy_(out_order[bn.channel_index])
        bn.refresh()
    else:
        order = torch.argsort(out_order)              # position -> original channel
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(bn, name, None)
            if tensor is not None:
                tensor.copy_(tensor[order.to(tensor.device)])
        consumer.in_index.copy_(out_order[consumer.in_index])
        consumer.refresh()
    producer.out_order.copy_(torch.arange(out_order.numel(), device=out_order.device))
    producer.refresh()
    return True


# --- pass 2: dead channels ---------------------------------------------------------------------

@torch.no_grad()
def drop_outputs(layer: DiverseGroupConv2d | DiverseGroupLinear, keep: torch.Tensor) -> None:
    """Keep only the output channels at positions ``keep`` (sorted; the layer emits group order,
    out_order is the identity). Groups left without filters disappear with their inputs."""
    if layer._reorder:
        raise ValueError("drop_outputs needs a layer whose output order was folded")
    keep_set = torch.zeros(layer.out_features_total, dtype=torch.bool)
    keep_set[keep.cpu()] = True
    weights, group_out, group_in, index_parts = [], [], [], []
    start_out = start_in = 0
    for w, size_out, size_in in zip(layer.weights, layer.group_out, layer.group_in):
        rows = keep_set[start_out:start_out + size_out]
        if bool(rows.any()):
            weights.append(nn.Parameter(w.detach()[rows.to(w.device)].clone(), requires_grad=w.requires_grad))
            group_out.append(int(rows.sum()))
            group_in.append(size_in)
            index_parts.append(layer.in_index[start_in:start_in + size_in])
        start_out += size_out
        start_in += size_in
    n = int(keep_set.sum())
    layer.weights = nn.ParameterList(weights)
    layer.group_out, layer.group_in = group_out, group_in
    layer.in_index = torch.cat(index_parts) if index_parts else layer.in_index[:0]
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep_set.to(layer.bias.device)].clone(),
                                  requires_grad=layer.bias.requires_grad)
    layer.out_order = torch.arange(n, device=layer.out_order.device)
    layer.out_features_total = n
    if isinstance(layer, DiverseGroupConv2d):
        layer.out_channels = n
    else:
        layer.out_features = n
    layer.plan = None
    layer.refresh()


@torch.no_grad()
def drop_dead_channels(model: nn.Module, producer_name: str, bn_name: str, consumer_name: str,
                       align: int = 8) -> int:
    """Drop the producer's filters (and BN channels) whose output the consumer never reads.
    A producer whose filter count is a multiple of ``align`` keeps it one: a few dead filters
    are kept (computed, never read) rather than leave an odd count, because a 1x1 conv with 127
    filters ran 11-21 % slower than with 128 on a 2-core CPU (channels_last, batch 8).
    Returns the number of channels dropped."""
    producer, bn = model.get_submodule(producer_name), model.get_submodule(bn_name)
    consumer = model.get_submodule(consumer_name)
    reads = bn.channel_index if _gathers(bn) else consumer.in_index
    used = torch.unique(reads.cpu())
    total = producer.out_features_total
    dropped = total - used.numel()
    if align > 1 and total % align == 0 and dropped % align:
        unused = torch.ones(total, dtype=torch.bool)
        unused[used] = False
        spare = torch.nonzero(unused).flatten()[:dropped % align]
        used = torch.sort(torch.cat([used, spare])).values
        dropped = total - used.numel()
    if dropped == 0:
        return 0
    remap = torch.full((total,), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    drop_outputs(producer, used)
    if _gathers(bn):
        bn.channel_index.copy_(remap.to(bn.channel_index.device)[bn.channel_index])
        bn.in_channels = used.numel()
        bn.refresh()
    else:
        shrunk = GatheredBatchNorm2d.from_bn(bn, used)
        shrunk.in_channels = used.numel()
        shrunk.channel_index.copy_(torch.arange(used.numel()))
        shrunk.refresh()
        _set(model, bn_name, shrunk)
        consumer.in_index = remap.to(consumer.in_index.device)[consumer.in_index]
        consumer.in_channels = used.numel()
        consumer.refresh()
    return dropped


# --- pass 3: execution plans -------------------------------------------------------------------

def _group_sets(layer) -> tuple[list[int], list[int]]:
    """Per group: its input channels as a Python int bit set, and its filter count."""
    sets, start = [], 0
    index = layer.in_index.cpu().tolist()
    for size_in in layer.group_in:
        bits = 0
        for c in index[start:start + size_in]:
            bits |= 1 << c
        sets.append(bits)
        start += size_in
    return sets, list(layer.group_out)


def merge_groups(sets: list[int], sizes: list[int], buckets: int) -> list[list[int]]:
    """Greedily merge groups into ``buckets`` buckets, each time joining the pair whose union
    adds the fewest zero-filled weights (filters x union of inputs)."""
    clusters = [([g], s, n) for g, (s, n) in enumerate(zip(sets, sizes))]
    cost = lambda s, n: n * s.bit_count()                       # noqa: E731
    while len(clusters) > max(1, buckets):
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                (_, si, ni), (_, sj, nj) = clusters[i], clusters[j]
                extra = cost(si | sj, ni + nj) - cost(si, ni) - cost(sj, nj)
                if best is None or extra < best[0]:
                    best = (extra, i, j)
        _, i, j = best
        gi, si, ni = clusters[i]
        gj, sj, nj = clusters.pop(j)
        clusters[i] = (sorted(gi + gj), si | sj, ni + nj)
    clusters.sort(key=lambda c: c[0][0])
    return [c[0] for c in clusters]


def candidate_plans(layer) -> list[dict | None]:
    """Exact plans worth timing: the per-group form (None), merged buckets run as a loop or as
    one grouped convolution, and the dense layer."""
    sets, sizes = _group_sets(layer)
    groups = len(sets)
    plans: list[dict | None] = [None, dense_plan(layer)]
    nonempty = sum(1 for s, n in zip(sets, sizes) if s and n)
    counts = sorted({b for b in (nonempty, 8, 4, 2) if 1 < b <= nonempty}, reverse=True)
    for b in counts:
        buckets = merge_groups(sets, sizes, b)
        plans.append({"mode": "loop", "buckets": buckets})
        if isinstance(layer, DiverseGroupConv2d):
            plans.append({"mode": "grouped", "buckets": buckets})
    return plans


def _set_plan(layer, plan: dict | None) -> None:
    layer.plan = plan
    layer.refresh()


def dense_plan(layer) -> dict:
    """The plan that runs the layer as its dense original: one kernel over every input."""
    return {"mode": "dense", "buckets": [list(range(len(layer.group_out)))]}


def estimate_cost(layer, plan: dict | None) -> float:
    """Rough relative cost without a device to time on: executed MACs plus a fixed cost per
    kernel call and per gathered input channel (tuned only to prefer fewer, larger calls)."""
    _set_plan(layer, plan)
    layer.eval()
    with torch.no_grad():
        macs = layer.exec_macs_per_position()
    dense = layer.out_features_total * layer._input_width() * (layer.weights[0][0].numel() if len(layer.weights) else 1)
    calls = len(layer._exec) if plan is not None else len(layer.weights) + 2
    gathered = sum(n for _, _, _, _, n in layer._exec) if plan is not None else sum(layer.group_in)
    penalty = 1.3 if plan is not None and plan["mode"] == "grouped" else 1.0
    return penalty * macs + 0.04 * dense * calls + 4.0 * gathered


def time_interleaved(fns: dict, repeats: int = 5, warmup: int = 2,
                     device: torch.device | None = None) -> dict:
    """Median wall time in seconds of each callable in ``fns``. Every round calls each one once,
    in a seeded random order, so a slow spell of a shared machine and the after-effects of one
    call on the next hit all of them alike (a CUDA device is synchronised around each call)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict = {name: [] for name in fns}
    names, order = list(fns), random.Random(0)
    for _ in range(repeats):
        # a fresh order each round: a call runs slower after a memory-hungry one (the exact
        # per-group model costs the next call ~25 %), so no callable may always follow another
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def capture_inputs(model: nn.Module, example_input, types=_DEPLOYED) -> dict[str, torch.Tensor]:
    """The input every module of ``types`` sees in one eval forward pass of ``example_input``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, name=n: seen.__setitem__(name, inp[0].detach()))
               for n, m in model.named_modules() if isinstance(m, types)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def choose_plan(layer, x: torch.Tensor | None = None, repeats: int = 5, margin: float = 0.05) -> dict:
    """Give ``layer`` its fastest exact plan; returns {plan label: seconds or estimated cost}.

    Candidates are timed interleaved on ``x`` (or scored by the cost model without it). The
    dense plan is kept unless another is faster by more than ``margin``: a plan that wins only
    by timing noise must not be able to make the layer slower than its dense original."""
    was_training = layer.training
    layer.eval()
    plans = {plan_label(plan): plan for plan in candidate_plans(layer)}
    if x is None:
        results = {label: estimate_cost(layer, plan) for label, plan in plans.items()}
    else:
        copies = {}
        for label, plan in plans.items():
            candidate = copy.deepcopy(layer)
            _set_plan(candidate, plan)
            copies[label] = candidate
        results = time_interleaved({label: (lambda m=m: m(x)) for label, m in copies.items()},
                                   repeats=repeats, warmup=2, device=x.device)
    best = min(results, key=results.get)
    if best != "dense" and results[best] > (1.0 - margin) * results["dense"]:
        best = "dense"
    _set_plan(layer, plans[best])
    layer.train(was_training)
    return results


def plan_label(plan: dict | None) -> str:
    if plan is None:
        return "per-group"
    if plan["mode"] == "dense":
        return "dense"
    return f"{plan['mode']}-{len(plan['buckets'])}"


@torch.no_grad()
def reorder_groups(layer, new_order: list[int]) -> None:
    """Renumber the groups of ``layer`` (group new_order[k] becomes group k); its out_order
    absorbs the change so the layer's outputs stay the same."""
    segments_in, segments_out, start_in, start_out = [], [], 0, 0
    for size_out, size_in in zip(layer.group_out, layer.group_in):
        segments_in.append(layer.in_index[start_in:start_in + size_in])
        segments_out.append(torch.arange(start_out, start_out + size_out))
        start_in += size_in
        start_out += size_out
    old_rows = torch.cat([segments_out[g] for g in new_order]) if new_order else torch.zeros(0, dtype=torch.long)
    new_position = torch.empty_like(old_rows)
    new_position[old_rows] = torch.arange(old_rows.numel())
    layer.in_index = torch.cat([segments_in[g] for g in new_order]) if new_order else layer.in_index
    layer.weights = nn.ParameterList([layer.weights[g] for g in new_order])
    layer.group_out = [layer.group_out[g] for g in new_order]
    layer.group_in = [layer.group_in[g] for g in new_order]
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.detach()[old_rows.to(layer.bias.device)])
    layer.out_order.copy_(new_position.to(layer.out_order.device)[layer.out_order])
    if layer.plan is not None:
        renumber = {old: new for new, old in enumerate(new_order)}
        layer.plan = {"mode": layer.plan["mode"],
                      "buckets": [sorted(renumber[g] for g in b) for b in layer.plan["buckets"]]}
    layer.refresh()


def _bucket_order(layer) -> list[int] | None:
    """Group order that makes a loop plan's buckets contiguous (its pieces then emit group order)."""
    if layer.plan is None or layer.plan["mode"] == "grouped":
        return None
    return [g for bucket in layer.plan["buckets"] for g in bucket]


# --- pass 4: gathered BatchNorms --------------------------------------------------------------

def gathered_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Fully-qualified (BN, conv) names where a gathering BN feeds a deployed conv through
    element-wise ops only (the pairs sgdet.deploy gathered, e.g. DenseNet's norm1 -> conv1)."""
    from .deploy import BN_CONV_PAIRS
    found = []
    for prefix, module in model.named_modules():
        pairs = BN_CONV_PAIRS.get(type(module))
        if pairs is None and isinstance(module, nn.Sequential):
            names, mods = list(module._modules), list(module._modules.values())
            pairs = []
            for i, m in enumerate(mods):
                j = i + 1
                while j < len(mods) and isinstance(mods[j], _ELEMENTWISE):
                    j += 1
                if isinstance(m, GatheredBatchNorm2d) and j < len(mods) and isinstance(mods[j], DiverseGroupConv2d):
                    pairs.append((names[i], names[j]))
        join = (prefix + ".") if prefix else ""
        for a, b in pairs or ():
            bn, conv = getattr(module, a, None), getattr(module, b, None)
            if _gathers(bn) and isinstance(conv, DiverseGroupConv2d) and bn.num_features == conv.in_channels:
                found.append((join + a, join + b))
    return found


@torch.no_grad()
def ungather_batchnorm(model: nn.Module, bn_name: str, conv_name: str) -> None:
    """Replace a gathering BN by a plain BN over its whole input and let the conv read the
    original channel numbers. Where the BN keeps most channels, the gather (a copy of a wide
    DenseNet feature map) costs more than normalising the few extra channels, which no group
    reads: they get weight 0 and bias 0. Exact for finite inputs."""
    bn, conv = model.get_submodule(bn_name), model.get_submodule(conv_name)
    full = nn.BatchNorm2d(bn.in_channels, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    reference = bn.running_mean if bn.running_mean is not None else bn.weight
    if reference is not None:
        full = full.to(device=reference.device, dtype=reference.dtype)
    full.train(bn.training)
    index = bn.channel_index
    if bn.affine:
        full.weight.zero_()
        full.weight[index] = bn.weight
        full.bias[index] = bn.bias
    if bn.track_running_stats:
        full.running_mean[index] = bn.running_mean
        full.running_var[index] = bn.running_var
        full.num_batches_tracked.copy_(bn.num_batches_tracked)
    conv.in_index.copy_(index[conv.in_index])
    conv.in_channels = bn.in_channels
    conv.refresh()
    _set(model, bn_name, full)


def _ungather_pays(bn, conv, x: torch.Tensor | None, repeats: int, margin: float) -> bool:
    """Time BN + conv gathered and un-gathered on the BN's real input; without one, un-gather
    where the BN keeps at least 90 % of its input (the gather then saves almost no work)."""
    if x is None:
        return bn.num_features >= 0.9 * bn.in_channels
    trial = copy.deepcopy(nn.ModuleDict({"bn": bn, "conv": conv})).eval()
    ungather_batchnorm(trial, "bn", "conv")
    seconds = time_interleaved({"gathered": lambda: conv(bn(x)), "full": lambda: trial.conv(trial.bn(x))},
                               repeats=repeats, warmup=2, device=x.device)
    return seconds["full"] < (1.0 - margin) * seconds["gathered"]


@torch.no_grad()
def optimize(model: nn.Module, example_input: torch.Tensor | None = None, repeats: int = 5,
             dead_channels: bool = True, plans: bool = True, ungather: bool = True,
             margin: float = 0.05, verify: bool = True, align: int = 8) -> dict:
    """Make a deployed model fast, in place: fold permutations, drop dead channels, give every
    deployed layer its fastest exact plan, and un-gather BNs where that pays. Decisions are
    timed on ``example_input`` (on the device, and in the memory format, it comes in: pass a
    channels_last input to tune a model that will run channels_last) or, without one, taken
    from a cost model. Another form replaces the dense one only when faster by ``margin``.
    With ``verify`` and an example, the tuned model is finally timed whole against the same
    model with every layer on its dense plan and every gathered BN un-gathered (the dense
    model's computation), and falls back to that when it is not faster by ``margin``: layers
    tuned one by one can still lose together (caches, layouts). The dead-channel pass leaves
    filter counts that are multiples of ``align`` multiples of it (``align=1``: drop every dead filter).
    Returns a report {"layers": {layer: {"plan": label, "candidates": {...}}}, ...}."""
    if any(type(m).__name__ in ("SGConv2d", "SGLinear") for m in model.modules()):
        raise ConfigError("optimize() takes a deployed model; call sgdet.deploy(model, optimize=True)")
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"margin must be in [0, 1), got {margin!r}")
    was_training = model.training
    model.eval()
    report: dict = {"dropped_channels": 0, "ungathered_norms": 0, "layers": {}}
    chains = conv_bn_conv_chains(model)
    for names in chains:
        p, bn, c = (model.get_submodule(n) for n in names)
        fold_permutation(p, bn, c)
        if dead_channels:
            report["dropped_channels"] += drop_dead_channels(model, *names, align=align)
    fallback, fallback_ungathered = None, 0
    if verify and example_input is not None and (plans or ungather) and len(model._modules):
        # the fallback computes what the dense model does: full-width BNs, dense kernels
        fallback = copy.deepcopy(model)
        for bn_name, conv_name in gathered_bn_pairs(fallback):
            ungather_batchnorm(fallback, bn_name, conv_name)
            fallback_ungathered += 1
        for layer in fallback.modules():
            if isinstance(layer, _DEPLOYED) and len(layer.weights):
                _set_plan(layer, dense_plan(layer))
    if plans:
        inputs = capture_inputs(model, example_input) if example_input is not None else {}
        for name, layer in model.named_modules():
            if isinstance(layer, _DEPLOYED) and len(layer.weights):
                results = choose_plan(layer, inputs.get(name) if example_input is not None else None,
                                      repeats, margin)
                report["layers"][name] = {"plan": plan_label(layer.plan), "candidates": results}
    for names in conv_bn_conv_chains(model):       # make bucketed producers emit bucket order
        p, bn, c = (model.get_submodule(n) for n in names)
        order = _bucket_order(p)
        if order is not None and order != list(range(len(order))):
            reorder_groups(p, order)
        fold_permutation(p, bn, c)
    if ungather:
        pairs = gathered_bn_pairs(model)
        norms = (capture_inputs(model, example_input, (GatheredBatchNorm2d,))
                 if example_input is not None and pairs else {})
        for bn_name, conv_name in pairs:
            bn, conv = model.get_submodule(bn_name), model.get_submodule(conv_name)
            if _ungather_pays(bn, conv, norms.get(bn_name), repeats, margin):
                ungather_batchnorm(model, bn_name, conv_name)
                report["ungathered_norms"] += 1
    if fallback is not None:
        report["verified"] = _keep_if_faster(model, fallback, example_input, repeats, margin, report,
                                             fallback_ungathered)
    model.train(was_training)
    return report


def _keep_if_faster(model: nn.Module, fallback: nn.Module, x: torch.Tensor, repeats: int,
                    margin: float, report: dict, fallback_ungathered: int = 0) -> dict:
    """Time the tuned model against its copy on dense plans with un-gathered BNs; swap the
    copy's modules into ``model`` (in place, so callers' references stay valid) unless tuning
    won by ``margin``."""
    # more rounds than a layer gets: one wrong verdict here costs the whole network
    seconds = time_interleaved({"tuned": lambda: model(x), "dense": lambda: fallback(x)},
                               repeats=max(2 * repeats, 10), warmup=2, device=x.device)
    kept = seconds["tuned"] < (1.0 - margin) * seconds["dense"]
    if not kept:
        for name, child in fallback.named_children():
            model._modules[name] = child
        for name, layer in model.named_modules():
            if name in report["layers"]:
                report["layers"][name]["plan"] = plan_label(layer.plan)
        report["ungathered_norms"] = fallback_ungathered
    return {"tuned_s": seconds["tuned"], "dense_s": seconds["dense"], "kept": kept}
