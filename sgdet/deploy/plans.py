"""Deployment, fast stage, execution plans: how a deployed layer runs in eval mode, all exact.

A plan is a dict {"mode", "buckets"[, "variant"]}; only this file reads its keys. ``buckets``
lists the layer's groups merged into buckets; ``mode`` says how they run: "loop" runs each bucket
as one dense layer over the union of its groups' inputs (zero-filled), "grouped" runs every
bucket, padded to one size, as a single grouped convolution, "dense" runs one layer over every
input, "native" runs every group at once in the native kernel (sgdet.deploy.native: each group
reads its channels through its index list, nothing is gathered; ``variant`` is the kernel's tile
shape; the C++ kernel on the CPU, the Triton kernel on CUDA: native_kind). None is the exact per-group form. Here plans are built (candidate_plans), compiled into
the tensors a layer runs (compile_plan, compile_native), scored or timed and chosen
(choose_plan)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import native
from .native import cuda as native_cuda
from .timing import confirmed_win, time_interleaved

BACKENDS = ("auto", "native", "torch")

# --- format -------------------------------------------------------------------------------------


def normalize(plan: dict | None) -> dict | None:
    """``plan`` in plain Python types (as stored in a checkpoint's structure)."""
    if plan is None:
        return None
    plain = {"mode": str(plan["mode"]), "buckets": [[int(g) for g in b] for b in plan["buckets"]]}
    if plain["mode"] == "native":
        plain["variant"] = int(plan.get("variant", 0))
    return plain


def loop_plan(buckets: list[list[int]]) -> dict:
    """Each bucket of groups as one dense layer over the union of its groups' inputs."""
    return {"mode": "loop", "buckets": buckets}


def grouped_plan(buckets: list[list[int]]) -> dict:
    """Every bucket, padded to the largest, in one grouped convolution."""
    return {"mode": "grouped", "buckets": buckets}


def dense_plan(layer) -> dict:
    """The plan that runs the layer as its dense original: one kernel over every input."""
    return {"mode": "dense", "buckets": [list(range(len(layer.group_out)))]}


def native_plan(layer, variant: int = 0) -> dict:
    """Every group at once in the native kernel, with tile shape ``variant``."""
    return {"mode": "native", "buckets": [list(range(len(layer.group_out)))], "variant": int(variant)}


def is_native(plan: dict | None) -> bool:
    return plan is not None and plan["mode"] == "native"


def plan_label(plan: dict | None) -> str:
    if plan is None:
        return "per-group"
    if plan["mode"] == "dense":
        return "dense"
    if plan["mode"] == "native":
        return f"native-{plan['variant']}"
    return f"{plan['mode']}-{len(plan['buckets'])}"


# --- construction -------------------------------------------------------------------------------

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


def native_kind(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Which native kernel runs tensors of ``device`` and ``dtype``: "cpu" (the C++ kernels:
    float32, extension built), "cuda" (the Triton kernel: float32, float16, bfloat16, triton
    installed; imported only when a layer is packed for it), or None."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "cpu" if dtype == torch.float32 and native.available() else None
    if kind == "cuda":
        return "cuda" if native_cuda.supports(device, dtype) else None
    return None


def native_variant_count(device: torch.device | str) -> int:
    """How many tile variants the native kernel for ``device`` has (native plans 0..count-1)."""
    return len(native_cuda.VARIANTS) if torch.device(device).type == "cuda" else len(native.variants())


def native_applies(layer, x: torch.Tensor | None = None) -> bool:
    """Whether a native kernel can run ``layer`` (on input ``x``): see native_kind; the input
    must be for the same kernel as the layer, and the C++ kernel reads NCHW planes (the Triton
    kernel takes any strides)."""
    if not len(layer.weights):
        return False
    weight = layer.weights[0]
    kind = native_kind(weight.device, weight.dtype)
    if kind is None:
        return False
    if x is not None and native_kind(x.device, x.dtype) != kind:
        return False
    if kind == "cpu" and x is not None and x.dim() == 4 and not x.is_contiguous():
        return False
    padding, kernel = getattr(layer, "padding", None), getattr(layer, "kernel_size", ())
    if padding == "same" and any(d * (k - 1) % 2 for d, k in zip(layer.dilation, kernel)):
        return False                  # torch pads such a "same" conv unevenly
    return True


def candidate_plans(layer, backend: str = "auto", x: torch.Tensor | None = None) -> list[dict | None]:
    """Exact plans worth timing: the per-group form (None), the dense layer, the native kernel's
    tile shapes (where it applies), merged buckets run as a loop or as one grouped convolution.
    ``backend="native"`` offers only the native plans, ``"torch"`` none of them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    natives = ([native_plan(layer, v) for v in range(native_variant_count(layer.weights[0].device))]
               if backend != "torch" and native_applies(layer, x) else [])
    if backend == "native":
        return natives
    sets, sizes = _group_sets(layer)
    plans: list[dict | None] = [None, dense_plan(layer), *natives]
    nonempty = sum(1 for s, n in zip(sets, sizes) if s and n)
    counts = sorted({b for b in (nonempty, 8, 4, 2) if 1 < b <= nonempty}, reverse=True)
    for b in counts:
        buckets = merge_groups(sets, sizes, b)
        plans.append(loop_plan(buckets))
        if layer.supports_grouped:
            plans.append(grouped_plan(buckets))
    return plans


# --- execution: the tensors a layer runs ----------------------------------------------------------

def _group_segments(layer):
    """Per group: (input indices into the layer input, weight, output positions in cat order)."""
    segments, start_in, start_out = [], 0, 0
    for g, (size_out, size_in) in enumerate(zip(layer.group_out, layer.group_in)):
        segments.append((layer.in_index[start_in:start_in + size_in], layer.weights[g],
                         torch.arange(start_out, start_out + size_out, device=layer.in_index.device)))
        start_in += size_in
        start_out += size_out
    return segments


@torch.no_grad()
def compile_native(layer) -> dict[str, torch.Tensor]:
    """The native kernel's packed tensors for ``layer``: its per-group weights and index lists
    as they are, each filter writing straight to its output channel (no reorder pass). Packed on
    the CPU; a CUDA layer's are then moved there (weight in its dtype) and the Triton kernel is
    registered."""
    parts = torch.split(layer.in_index.cpu(), layer.group_in) if len(layer.group_in) else []
    out_channel = torch.argsort(layer.out_order.cpu())      # group-order position -> channel
    weights = [w.detach().cpu() for w in layer.weights]
    if weights and weights[0].dim() == 2:                   # linear: [o, k] -> [o, k, 1, 1]
        weights = [w[:, :, None, None] for w in weights]
    bias = None if layer.bias is None else layer.bias.detach().cpu()
    bn, scale, shift = layer._folded_bn, None, None
    if bn is not None:                                      # y = scale * (conv + bias) + shift
        scale, shift = bn.inference_affine()
        scale, shift = scale.detach().cpu()[out_channel], shift.detach().cpu()[out_channel]
    packed = native.pack_conv(weights, list(parts), out_channel, bias=bias, scale=scale, shift=shift)
    device = layer.weights[0].device if len(layer.weights) else torch.device("cpu")
    if device.type == "cuda":
        native_cuda.register()
        packed = native_cuda.to_device(packed, device, layer.weights[0].dtype)
    return packed


@torch.no_grad()
def compile_plan(layer, plan: dict) -> tuple[list[tuple], torch.Tensor | None]:
    """The tensors that run ``plan`` on ``layer``: pieces [(input channels, None for all in order;
    weight; bias; input count)] whose outputs are concatenated, and the index that puts that
    concatenation in channel order (None where it already is)."""
    mode, buckets = plan["mode"], plan["buckets"]
    segments = _group_segments(layer)
    ref = layer.in_index
    kernel = tuple(layer.weights[0].shape[2:]) if len(layer.weights) else ()
    dtype = layer.weights[0].dtype if len(layer.weights) else torch.float32
    width, total = layer.input_width, layer.out_features_total
    pieces = []           # (channels, weight, bias, cat positions)
    for bucket in buckets:
        if mode == "dense":
            chans = torch.arange(width, device=ref.device)
        else:
            parts = [segments[g][0] for g in bucket]
            chans = torch.unique(torch.cat(parts)) if parts else ref.new_zeros(0)
        if len(buckets) == 1 and mode != "grouped":
            # one piece covers every filter: lay its rows out in the final output order, so
            # no reorder runs after it (a reorder of a wide output can cost more than a 1x1 conv)
            rows = layer.out_order.clone()
        else:
            rows = torch.cat([segments[g][2] for g in bucket]) if bucket else ref.new_zeros(0)
        dest = torch.full((total,), -1, dtype=torch.long, device=ref.device)
        dest[rows] = torch.arange(rows.numel(), device=ref.device)
        weight = torch.zeros(rows.numel(), chans.numel(), *kernel, dtype=dtype, device=ref.device)
        for g in bucket:
            index, w, out_rows = segments[g]
            cols = torch.searchsorted(chans, index)
            weight[dest[out_rows].view(-1, 1), cols.view(1, -1)] = w.detach()
        bias = None if layer.bias is None else layer.bias.detach()[rows]
        pieces.append((chans, weight, bias, rows))
    if mode == "grouped":
        pieces = [_pad_pieces(pieces, kernel, dtype, ref.device, layer.bias is not None)]
    if len(kernel) == 2 and any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                                for w in layer.weights):
        # a channels_last model keeps its plan weights channels_last: no reorder per call
        pieces = [(c, w.contiguous(memory_format=torch.channels_last), b, r) for c, w, b, r in pieces]
    cat_rows = torch.cat([p[3] for p in pieces])            # exec position -> cat position
    position = torch.full((total,), -1, dtype=torch.long, device=ref.device)
    real = cat_rows >= 0
    position[cat_rows[real]] = torch.nonzero(real).flatten()
    exec_out = position[layer.out_order]                    # output channel -> exec position
    compiled = []
    for chans, weight, bias, _ in pieces:
        full = chans.numel() == width and torch.equal(chans, torch.arange(width, device=chans.device))
        compiled.append((None if full else chans.clone(), weight, bias, int(chans.numel())))
    in_order = cat_rows.numel() == exec_out.numel() and torch.equal(
        exec_out, torch.arange(exec_out.numel(), device=exec_out.device))
    return compiled, None if in_order else exec_out


def _pad_pieces(pieces, kernel, dtype, device, has_bias: bool):
    """One grouped piece: every bucket padded to the largest bucket's inputs and outputs with
    zero weights (padding reads channel 0 and emits rows that are never selected)."""
    n_in = max(1, max(p[0].numel() for p in pieces))
    n_out = max(p[1].shape[0] for p in pieces)
    chans = torch.zeros(len(pieces) * n_in, dtype=torch.long, device=device)
    weight = torch.zeros(len(pieces) * n_out, n_in, *kernel, dtype=dtype, device=device)
    bias = torch.zeros(len(pieces) * n_out, dtype=dtype, device=device) if has_bias else None
    rows = torch.full((len(pieces) * n_out,), -1, dtype=torch.long, device=device)
    for b, (c, w, bb, r) in enumerate(pieces):
        chans[b * n_in:b * n_in + c.numel()] = c
        weight[b * n_out:b * n_out + w.shape[0], :w.shape[1]] = w
        if bias is not None:
            bias[b * n_out:b * n_out + w.shape[0]] = bb
        rows[b * n_out:b * n_out + w.shape[0]] = r
    return chans, weight, bias, rows


# --- choice ---------------------------------------------------------------------------------------

def estimate_cost(layer, plan: dict | None) -> float:
    """Rough relative cost without a device to time on: executed MACs plus a fixed cost per
    kernel call and per gathered input channel (tuned only to prefer fewer, larger calls)."""
    dense = layer.out_features_total * layer.input_width * (layer.weights[0][0].numel() if len(layer.weights) else 1)
    if plan is None:
        macs = sum(w.numel() for w in layer.weights)
        calls, gathered = len(layer.weights) + 2, sum(layer.group_in)
    elif is_native(plan):
        # no gather, one call; 1.4: the kernel ran at 55-77 % of oneDNN's speed per MAC
        return 1.4 * sum(w.numel() for w in layer.weights) + 0.04 * dense + plan["variant"]
    else:
        pieces, _ = compile_plan(layer, plan)
        macs = sum(w.numel() for _, w, _, size_in in pieces if size_in)
        calls, gathered = len(pieces), sum(size_in for _, _, _, size_in in pieces)
    penalty = 1.3 if plan is not None and plan["mode"] == "grouped" else 1.0
    return penalty * macs + 0.04 * dense * calls + 4.0 * gathered


@torch.no_grad()
def choose_plan(layer, x: torch.Tensor | None = None, repeats: int = 5, margin: float = 0.05,
                backend: str = "auto") -> dict:
    """Give ``layer`` its fastest exact plan; returns {plan label: seconds or estimated cost}.

    Candidates are timed interleaved on ``x`` (or scored by the cost model without it). The
    dense plan is kept unless another is faster by more than ``margin``: a plan that wins only
    by timing noise must not be able to make the layer slower than its dense original. A close
    win is timed again against dense (timing.confirmed_win); its medians are returned under
    "confirm: <label>" and "confirm: dense".
    ``backend="native"`` runs the layer natively (its fastest tile shape), ``"torch"`` never."""
    was_training = layer.training
    layer.eval()
    plans = {plan_label(plan): plan for plan in candidate_plans(layer, backend, x)}
    if not plans:
        raise ValueError(f"the native kernel cannot run this layer: {native.unavailable_reason() or 'it runs float32 CPU layers on NCHW input, and CUDA layers'}")
    if x is None:
        results = {label: estimate_cost(layer, plan) for label, plan in plans.items()}
    else:
        copies = {}
        for label, plan in plans.items():
            candidate = copy.deepcopy(layer)
            candidate.set_plan(plan)
            copies[label] = candidate
        results = time_interleaved({label: (lambda m=m: m(x)) for label, m in copies.items()},
                                   repeats=repeats, warmup=2, device=x.device)
    best = min(results, key=results.get)
    if "dense" in results and best != "dense":
        if x is None:
            wins = results[best] <= (1.0 - margin) * results["dense"]
        else:
            wins, again = confirmed_win(lambda: copies[best](x), lambda: copies["dense"](x),
                                        {"fast": results[best], "dense": results["dense"]},
                                        margin, repeats, x.device)
            if again:
                results[f"confirm: {best}"], results["confirm: dense"] = again["fast"], again["dense"]
        if not wins:
            best = "dense"
    layer.set_plan(plans[best])
    layer.train(was_training)
    return results


# --- group order that suits a plan ----------------------------------------------------------------

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
    plan = layer.plan
    if plan is not None:
        renumber = {old: new for new, old in enumerate(new_order)}
        plan = {"mode": plan["mode"], "buckets": [sorted(renumber[g] for g in b) for b in plan["buckets"]]}
    layer.set_plan(plan)            # refreshes the layer from its new weights


def bucket_order(layer) -> list[int] | None:
    """Group order that makes a loop plan's buckets contiguous (its pieces then emit group order)."""
    if layer.plan is None or layer.plan["mode"] in ("grouped", "native"):
        return None
    return [g for bucket in layer.plan["buckets"] for g in bucket]
