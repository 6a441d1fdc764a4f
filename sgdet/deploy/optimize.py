"""Deployment, fast stage: turns an exactly deployed model (sgdet.deploy) into one that really
runs faster, with the same outputs to float32 rounding.

Five passes, all exact:
1. Permutation folding: where a deployed conv feeds another through a BatchNorm (and element-wise
   ops), its output is left in group order; the BN's parameters and the next conv's gather index
   are permuted instead, so no standalone reorder runs.
2. Dead channels: filters whose output no group of the next conv reads are dropped, with their
   BN channels (ResNet bottlenecks conv1->bn1->conv2->bn2->conv3, DenseNet conv1->norm2->conv2).
3. Execution plan per layer: groups merged into buckets of similar input sets (zero-filled),
   run as a loop of dense layers, as one padded grouped convolution, or as the dense layer over
   every input, or on the native kernel (sgdet.deploy.native: no gather at all); chosen by
   timing the candidates interleaved on the layer's real input
   (``example_input``) or, without one, by a cost model. The dense form is always a candidate and
   is only replaced by a form faster by a margin, so noise cannot pick a slower layer.
4. Native layers take the BatchNorm after them into their kernel (FoldedBatchNorm2d), and
   blocks whose convs all do so run their ReLUs and residual add at the kernels' stores too
   (sgdet.deploy.fusion).
5. Gathered BatchNorms (DenseNet's norm1, which selects the channels conv1 reads) become plain
   BNs over their whole input where the gather, a copy of a wide feature map, costs more than it
   saves.
6. The parts left dense (stem, shortcut convs) fold the BN after them into their weights, and a
   stem's ReLU + max-pool runs in channels_last where that is faster (sgdet.deploy.dense_parts).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import is_sg_layer
from .modules import (DiverseGroupConv2d, DiverseGroupLinear, FoldedBatchNorm2d, GatheredBatchNorm2d,
                      is_gathering, link_folded_norms)
from .dense_parts import (ChannelsLastMaxPool2d, FoldedConv2d, fold_dense_convs, pool_stems_channels_last,
                          pools_channels_last)
from .fusion import fuse_blocks
from .patterns import conv_bn_conv_chains, conv_bn_pairs, gathered_bn_pairs
from . import native
from .native import cuda as native_cuda
from .plans import (BACKENDS, bucket_order, choose_plan, dense_plan, native_applies, native_kind,
                    plan_label, reorder_groups)
from .timing import confirmed_win, time_interleaved

_DEPLOYED = (DiverseGroupConv2d, DiverseGroupLinear)
log = logging.getLogger("sgdet")


# --- pass 1: permutation folding ---------------------------------------------------------------

@torch.no_grad()
def fold_permutation(producer: DiverseGroupConv2d, bn: nn.BatchNorm2d, consumer: DiverseGroupConv2d) -> bool:
    """Let ``producer`` emit its channels in group order; permute ``bn`` and ``consumer`` instead."""
    if not producer.reorders_output:
        return False
    out_order = producer.out_order                   # original channel -> position in group order
    if is_gathering(bn):
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
    if layer.reorders_output:
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
    layer.set_plan(None)            # refreshes the layer from its new weights


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
    reads = bn.channel_index if is_gathering(bn) else consumer.in_index
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
    if is_gathering(bn):
        bn.channel_index.copy_(remap.to(bn.channel_index.device)[bn.channel_index])
        bn.in_channels = used.numel()
        bn.refresh()
    else:
        shrunk = GatheredBatchNorm2d.from_bn(bn, used)
        shrunk.in_channels = used.numel()
        shrunk.channel_index.copy_(torch.arange(used.numel()))
        shrunk.refresh()
        model.set_submodule(bn_name, shrunk, strict=True)
        consumer.in_index = remap.to(consumer.in_index.device)[consumer.in_index]
        consumer.in_channels = used.numel()
        consumer.refresh()
    return dropped


# --- pass 3: execution plans (chosen in sgdet.deploy.plans) -------------------------------

def check_backend(backend: str, device: torch.device | None = None) -> None:
    """Refuse an unknown backend, and "native" where the kernel for ``device`` (the C++ one on
    the CPU, the Triton one on CUDA) is missing; say once, in one line, when "auto" has to do
    without it."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    gpu = device is not None and torch.device(device).type == "cuda"
    reason = native_cuda.unavailable_reason() if gpu else native.unavailable_reason()
    if backend == "native" and reason is not None:
        raise ConfigError(f"backend='native' but {reason}")
    if backend == "auto" and reason is not None and not _warned:
        _warned.append(True)
        log.warning("sgdet: native kernels unavailable (%s); using the torch plans", reason)


_warned: list = []


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
def one_group_conv(conv: nn.Conv2d) -> DiverseGroupConv2d:
    """A dense conv as a deployed conv with one group that reads every input (same outputs)."""
    layer = DiverseGroupConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                               conv.padding, conv.dilation, [conv.out_channels], [conv.in_channels],
                               conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
    layer.weights[0].copy_(conv.weight)
    layer.in_index.copy_(torch.arange(conv.in_channels))
    if conv.bias is not None:
        layer.bias.copy_(conv.bias)
    layer.train(conv.training)
    layer.refresh()
    return layer


@torch.no_grad()
def native_dense_convs(model: nn.Module, x: torch.Tensor, repeats: int, margin: float) -> list[str]:
    """Run the model's remaining dense convs (stem, shortcuts) on the native kernel as one group
    where that is faster than oneDNN by ``margin`` on their real input; returns their names."""
    dense = {n: m for n, m in model.named_modules()
             if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"}
    if not dense:
        return []
    inputs = capture_inputs(model, x, (nn.Conv2d,))
    moved = []
    for name, conv in dense.items():
        xin = inputs.get(name)
        candidate = one_group_conv(conv).eval()
        if xin is None or not native_applies(candidate, xin):
            continue
        choose_plan(candidate, xin, repeats, margin, backend="native")      # its fastest tile shape
        runs = {"fast": lambda: candidate(xin), "dense": lambda: conv(xin)}
        seconds = time_interleaved(runs, repeats=repeats, warmup=2, device=xin.device)
        if confirmed_win(runs["fast"], runs["dense"], seconds, margin, repeats, xin.device)[0]:
            model.set_submodule(name, candidate, strict=True)
            moved.append(name)
    return moved


# --- pass 3b: BatchNorms folded into native kernels -------------------------------------------

@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> int:
    """Let every conv that runs natively apply the BN right after it at its store (the BN then
    passes its input through in eval mode): one pass over the output fewer. Returns how many."""
    folded = 0
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if conv._native is None or isinstance(bn, FoldedBatchNorm2d) or bn.running_var is None:
            continue
        model.set_submodule(bn_name, FoldedBatchNorm2d.from_bn(bn, conv_name), strict=True)
        folded += 1
    if folded:
        link_folded_norms(model)
    return folded


# --- pass 4: gathered BatchNorms --------------------------------------------------------------

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
    model.set_submodule(bn_name, full, strict=True)


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
             margin: float = 0.05, verify: bool = True, align: int = 8, backend: str = "auto") -> dict:
    """Make a deployed model fast, in place: fold permutations, drop dead channels, give every
    deployed layer its fastest exact plan, fold the BNs of the convs left dense, and un-gather
    BNs where that pays. Decisions are timed on ``example_input`` (on the device, and in the
    memory format, it comes in: pass a channels_last input to tune a model that will run
    channels_last) or, without one, taken from a cost model. Another form replaces the dense
    one only when faster by ``margin``.
    With ``verify`` and an example, the tuned model is finally timed whole against the same
    model with every layer on its dense plan and every gathered BN un-gathered (the dense
    model's computation), and falls back to that when it is not faster by ``margin``: layers
    tuned one by one can still lose together (caches, layouts). The dead-channel pass keeps
    filter counts that are multiples of ``align`` multiples of it (``align=1``: drop every dead filter).
    ``backend``: "auto" offers the native kernels (sgdet.deploy.native) beside the torch plans
    where they are built; "native" runs every deployed layer natively (no dense fallback);
    "torch" never uses them.
    Returns a report {"layers": {layer: {"plan": label, "candidates": {...}}}, ...}."""
    if any(is_sg_layer(m) for m in model.modules()):
        raise ConfigError("optimize() takes a deployed model; call sgdet.deploy(model, optimize=True)")
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"margin must be in [0, 1), got {margin!r}")
    reference = next(model.parameters(), None)
    check_backend(backend, example_input.device if example_input is not None
                  else reference.device if reference is not None else None)
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
    if verify and backend != "native" and example_input is not None and (plans or ungather) and len(model._modules):
        # the fallback computes what the dense model does: full-width BNs, dense kernels
        fallback = copy.deepcopy(model)
        for bn_name, conv_name in gathered_bn_pairs(fallback):
            ungather_batchnorm(fallback, bn_name, conv_name)
            fallback_ungathered += 1
        for layer in fallback.modules():
            if isinstance(layer, _DEPLOYED) and len(layer.weights):
                layer.set_plan(dense_plan(layer))
    if plans:
        inputs = capture_inputs(model, example_input) if example_input is not None else {}
        for name, layer in model.named_modules():
            if isinstance(layer, _DEPLOYED) and len(layer.weights):
                results = choose_plan(layer, inputs.get(name) if example_input is not None else None,
                                      repeats, margin, backend)
                report["layers"][name] = {"plan": plan_label(layer.plan), "candidates": results}
    for names in conv_bn_conv_chains(model):       # make bucketed producers emit bucket order
        p, bn, c = (model.get_submodule(n) for n in names)
        order = bucket_order(p)
        if order is not None and order != list(range(len(order))):
            reorder_groups(p, order)
        fold_permutation(p, bn, c)
    if (plans and backend != "torch" and example_input is not None
            and native_kind(example_input.device, example_input.dtype) is not None):
        report["native_dense_convs"] = native_dense_convs(model, example_input, repeats, margin)
    report["folded_norms"] = fold_batchnorms(model) if backend != "torch" else 0
    report["fused_blocks"] = fuse_blocks(model) if report["folded_norms"] else 0
    report["folded_dense_convs"] = fold_dense_convs(model)
    if plans and example_input is not None and report["folded_dense_convs"]:
        stems = capture_inputs(model, example_input, (FoldedConv2d,))
        report["channels_last_pools"] = pool_stems_channels_last(model, stems, repeats, margin)
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
    if report.get("channels_last_pools"):     # the check may have put the stems back
        report["channels_last_pools"] = [n for n in report["channels_last_pools"]
                                         if isinstance(model.get_submodule(n), ChannelsLastMaxPool2d)]
    if (plans and example_input is not None and example_input.device.type == "cpu"
            and any(type(m) is nn.MaxPool2d for m in model.modules())):
        # after the check: each pool is timed on its own, and either model keeps the win
        pools = capture_inputs(model, example_input, (nn.MaxPool2d,))
        report["channels_last_pools"] = (report.get("channels_last_pools", [])
                                         + pools_channels_last(model, pools, repeats, margin))
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
            model.set_submodule(name, child, strict=True)
        for name, layer in model.named_modules():
            if name in report["layers"]:
                report["layers"][name]["plan"] = plan_label(layer.plan)
        report["ungathered_norms"] = fallback_ungathered
    return {"tuned_s": seconds["tuned"], "dense_s": seconds["dense"], "kept": kept}
