"""Deployment, native stage: a C++ CPU kernel for diverse group convolutions.

A diverse group conv splits its filters into groups, each reading its own subset of the input
channels (subsets may overlap and differ in size). The torch path gathers each group's input
(``x.index_select(1, idx)``) and runs one conv per group; that copy costs what the pruning
saved. This kernel reads the input planes through each group's index list inside its inner
loop, so nothing is gathered, and writes every filter straight to its output channel with the
bias, folded BatchNorm, residual and ReLU applied at the store.

Use::

    packed = pack_conv(weights, in_index, out_channel, bias, scale=bn_scale, shift=bn_shift)
    y = conv2d(x, packed, stride=1, padding=1, relu=True, residual=identity)

``packed`` is a dict of plain tensors (storable as module buffers; packing is deterministic):

    weight       float32 [kh, kw, sum(o_g * k_g)]: per tap, each group's filters in tiles of
                 ``pack_tile()`` (24) filters laid [tile][input channel][filter in tile]
                 (the last tile of a group is narrower; no padding). BN scale folded in.
    bias         float32 [F]: per filter (groups concatenated), scale * bias + shift
    in_index     int32 [sum k_g]: each group's input channels, concatenated
    groups       int64 [G, 5]: filter start, filters, index start, inputs, weight column
    out_channel  int32 [F]: the output channel each filter writes
    channel_filter int32 [C_out]: the filter writing each output channel (-1: none); its length
                 (max(out_channel) + 1) is the default output width
    meta         int64 [4]: format version, pack tile, kh, kw (for people; the ops read shapes)

The ops are ``torch.ops.sgdet.diverse_conv2d`` / ``diverse_linear`` (fake kernels registered
here, so torch.compile / torch.export see one op per layer and torch.jit.trace records it;
load a traced file after ``import sgdet.deploy.native``). Inference only: float32, no autograd.
On CUDA tensors the same ops run a Triton kernel instead (``triton_kernels.py``, registered on
first use by ``cuda.py``; float32, float16, bfloat16; the packed dict moved by ``cuda.to_device``).
Output channels no filter writes hold zero (the residual, through the ReLU, when given).
``norm_relu_gather`` (``torch.ops.sgdet.norm_relu_gather``, CPU only) is a DenseNet layer's
cat + eval-mode norm1 + ReLU in one pass, used by the fused DenseNet layers (``fusion.py``).

ISAs: ``avx512`` (avx512f+bw+vl), ``avx2`` (avx2+fma) and ``portable`` (any CPU), detected in
C++; ``set_isa`` or the ``SGDET_NATIVE_ISA`` environment variable (read at import) force one;
``SGDET_NATIVE_HIDE=avx512,avx2`` makes a process treat those as absent (tests, older CPUs).
Tile variants 0..3 (filters x pixel vectors; 0 is the default; time them per layer):
avx512 6x4, 8x3, 12x2, 4x6 (16 lanes); avx2 4x3, 6x2, 12x1, 8x1 (8 lanes); portable 4x2,
8x1, 3x1, 2x2 (8 lanes). Stride 1 with an output as wide as the input (same padding, 1x1)
reads each vector with one masked load; stride 2 loads two vectors and keeps the even lanes;
other geometries (stride 3+, valid padding, stride 2 onto maps under half a vector wide)
gather each lane, several times slower.

Weak spots (time per layer and keep the torch plan where it wins): ``linear`` runs the batch
along the vector lanes, so a batch under the lane count idles most lanes (batch 1: several times
slower than F.linear); the gather path; AVX2 on 7x7 maps.

The extension is built by ``make setup`` (setup.py); without a C++ compiler the install still
succeeds, ``available()`` is False and ``unavailable_reason()`` says why (the build leaves its
error in ``_build_error.txt`` beside this file, since pip hides a successful build's output)."""
from __future__ import annotations

import importlib.machinery
import os
import warnings

import torch

__all__ = ["available", "unavailable_reason", "isas", "isa", "set_isa", "set_pass_channels",
           "set_prefetch_next", "set_store_prefetch", "set_stride2_layout", "set_schedule",
           "variants", "pack_tile", "pack_conv", "conv2d", "linear", "norm_relu_gather"]

ISAS = ("avx512", "avx2", "portable")
FORMAT_VERSION = 1
_HERE = os.path.dirname(os.path.abspath(__file__))
_reason: str | None = None


def _load() -> str | None:
    """Load the extension's ops into torch.ops.sgdet; returns why not, or None."""
    try:
        torch.ops.sgdet.native_info   # already loaded (module reloaded, or loaded by hand)
        return None
    except (AttributeError, RuntimeError):
        pass
    paths = [os.path.join(_HERE, "_C" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        why = "no C++ compiler at install, or the build failed"
        try:
            with open(os.path.join(_HERE, "_build_error.txt")) as f:
                why = f"the build failed: {f.readline().strip()}"
        except OSError:
            pass
        return (f"the native extension was not built ({why}); rebuild with `make setup` or "
                "`pip install --no-build-isolation -e .` where g++ is installed")
    try:
        torch.ops.load_library(path)
        torch.ops.sgdet.native_info()
    except Exception as exc:  # noqa: BLE001 - wrong torch ABI, missing libgomp, ...
        return f"the native extension failed to load: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


_reason = _load()


def available() -> bool:
    """Whether the native kernel is built and loaded."""
    return _reason is None


def unavailable_reason() -> str | None:
    """One line saying why the kernel is unavailable (None when it is available)."""
    return _reason


def _require(x: torch.Tensor | None = None) -> None:
    if x is not None and x.device.type == "cuda":
        from . import cuda         # CUDA tensors run the Triton kernel (registered on first use)
        cuda.register()
        return
    if _reason is not None:
        raise RuntimeError(f"sgdet native kernel unavailable: {_reason}")


def _info() -> list[int]:
    _require()
    return list(torch.ops.sgdet.native_info())


def isas() -> list[str]:
    """ISAs this CPU runs, in preference order (a subset of avx512, avx2, portable)."""
    if _reason is not None:
        return []
    mask = _info()[0]
    return [name for i, name in enumerate(ISAS) if mask >> i & 1]


def isa() -> str:
    """The ISA the kernel uses now."""
    return ISAS[_info()[1]]


def set_isa(name: str | None) -> None:
    """Force an ISA (None or "auto": the best this CPU runs). ValueError if the CPU lacks it."""
    _require()
    if name is None or name == "auto":
        torch.ops.sgdet.native_set_isa(-1)
        return
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}: choose from {', '.join(ISAS)} (or None)")
    if name not in isas():
        raise ValueError(f"this CPU lacks the {name} instructions the kernel needs; it runs: "
                         f"{', '.join(isas())}")
    torch.ops.sgdet.native_set_isa(ISAS.index(name))


def set_pass_channels(channels: int | None) -> None:
    """Channels the kernel reads per pass over a pixel block (None or 0: automatic, sized so the
    block's input strip stays in L1 while every filter tile reads it). For tests, which force
    small passes to exercise the partial sums, and for tuning; results do not depend on it
    beyond float rounding order."""
    _require()
    torch.ops.sgdet.native_tune("pass_channels", int(channels or 0))


def set_prefetch_next(fmas: int | None) -> None:
    """Channel lists of at most `fmas` FMAs per tap have a group's first filter tile prefetch
    the next pixel block's rows into L2 (None or -1: the ISA's default; 0: never). For tests,
    which force both prefetch paths, and for A/B timing; results do not depend on it."""
    _require()
    torch.ops.sgdet.native_tune("prefetch_next", -1 if fmas is None else int(fmas))


def set_store_prefetch(blocks: int | None) -> None:
    """How many pixel blocks ahead the kernel's store prefetches each filter's output and
    residual pixels (None or -1: the ISA's default, 1 on AVX2, off elsewhere as unmeasured; 0:
    never). A block writes one plane per output channel, more streams than a CPU's prefetcher
    follows. For tests, which force both paths, and for A/B timing; results do not depend on it."""
    _require()
    torch.ops.sgdet.native_tune("store_prefetch", -1 if blocks is None else int(blocks))


def set_stride2_layout(layout: str | None) -> None:
    """How stride-2 convs read their input: "phases" (each channel split into phase planes
    first, then read like a stride-1 conv; used where the output rows are as wide as the
    planes), "rows" (strided loads, even lanes kept), or None / "auto" (the default: phases).
    For tests, which force both, and for A/B timing; results do not depend on it."""
    _require()
    modes = {None: -1, "auto": -1, "rows": 0, "phases": 1}
    if layout not in modes:
        raise ValueError(f"unknown stride-2 layout {layout!r}: choose rows, phases or None")
    torch.ops.sgdet.native_tune("stride2", modes[layout])


def set_schedule(schedule: str | None) -> None:
    """How a layer's work items are split among threads: "guided" (each thread takes the next
    run of items, runs shrinking as work runs out, so unequal groups even out), "static" (equal
    ranges) or None / "auto" (the default: guided for layers whose weights outgrow L2 and run
    group by group, static for the rest). For tests, which force both, and for A/B timing;
    results do not depend on it (each output is computed by one work item)."""
    _require()
    modes = {None: -1, "auto": -1, "guided": 1, "static": 0}
    if schedule not in modes:
        raise ValueError(f"unknown schedule {schedule!r}: choose guided, static or None")
    torch.ops.sgdet.native_tune("schedule", modes[schedule])


def pack_tile() -> int:
    """Filters per packed weight tile (every variant's filter tile divides it)."""
    return _info()[3] if _reason is None else 24


def variants(name: str | None = None) -> list[tuple[int, int, int]]:
    """Tile shapes of ISA ``name`` (default: the one in use), index = ``variant``:
    (filters per tile, pixel vectors per block, lanes per vector)."""
    info = _info()
    count = info[4]
    i = ISAS.index(name) if name is not None else info[1]
    flat = info[5 + 3 * count * i: 5 + 3 * count * (i + 1)]
    return [tuple(flat[3 * v: 3 * v + 3]) for v in range(count)]


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


def _vector(value, size: int, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value).detach().to(torch.float32).flatten()
    if t.numel() != size:
        raise ValueError(f"pack_conv: {name} has {t.numel()} values for {size} filters")
    return t


@torch.no_grad()
def pack_conv(weights, in_index, out_channel, bias=None, scale=None, shift=None) -> dict[str, torch.Tensor]:
    """Pack a diverse group conv (or linear) layer for conv2d / linear (see the module doc).

    weights: per group [o_g, k_g, kh, kw] (or [o_g, k_g] for a linear layer); in_index: per
    group the k_g input channels it reads; out_channel: [sum o_g], output channel of each filter
    (groups concatenated in order; injective); bias, scale, shift: [sum o_g] or None, computing
    scale * (conv + bias) + shift (an inference BatchNorm folded in)."""
    _register_flop_formulas()
    weights, in_index = list(weights), list(in_index)
    if not weights or len(weights) != len(in_index):
        raise ValueError(f"pack_conv: {len(weights)} weight groups for {len(in_index)} index lists")
    ws = []
    for g, w in enumerate(weights):
        w = torch.as_tensor(w).detach().to(torch.float32)
        if w.dim() == 2:
            w = w[:, :, None, None]
        if w.dim() != 4:
            raise ValueError(f"pack_conv: group {g} weight must be [o, k, kh, kw] or [o, k]")
        ws.append(w)
    kh, kw = ws[0].shape[2], ws[0].shape[3]
    if any(w.shape[2:] != (kh, kw) for w in ws):
        raise ValueError("pack_conv: groups have different kernel sizes")
    sizes = [w.shape[0] for w in ws]
    total = sum(sizes)
    out_channel = torch.as_tensor(out_channel).detach().to(torch.long).flatten()
    if out_channel.numel() != total:
        raise ValueError(f"pack_conv: out_channel has {out_channel.numel()} entries for {total} filters")
    if total and (int(out_channel.min()) < 0 or out_channel.unique().numel() != total):
        raise ValueError("pack_conv: out_channel must be distinct channels >= 0")
    b = _vector(bias, total, "bias")
    b = torch.zeros(total) if b is None else b
    s, t = _vector(scale, total, "scale"), _vector(shift, total, "shift")
    if s is not None:
        b = b * s
    if t is not None:
        b = b + t
    tile = pack_tile()
    cols, table, idx_all = [], [], []
    fstart = istart = wcol = 0
    for g, (w, idx) in enumerate(zip(ws, in_index)):
        idx = torch.as_tensor(idx).detach().to(torch.long).flatten()
        o, k = w.shape[0], w.shape[1]
        if idx.numel() != k or (k and int(idx.min()) < 0):
            raise ValueError(f"pack_conv: group {g} reads {k} channels but its index lists "
                             f"{idx.numel()} (all must be >= 0)")
        if s is not None:
            w = w * s[fstart:fstart + o].view(-1, 1, 1, 1)
        for p in range(0, o, tile):   # [tw, k, kh, kw] -> [kh, kw, k * tw]
            cols.append(w[p:p + tile].permute(2, 3, 1, 0).reshape(kh, kw, -1))
        table.append([fstart, o, istart, k, wcol])
        idx_all.append(idx)
        fstart, istart, wcol = fstart + o, istart + k, wcol + o * k
    out_width = int(out_channel.max()) + 1 if total else 0
    channel_filter = torch.full((out_width,), -1, dtype=torch.int32)
    channel_filter[out_channel] = torch.arange(total, dtype=torch.int32)
    return {
        "weight": torch.cat(cols, dim=2).contiguous() if cols else torch.zeros(kh, kw, 0),
        "bias": b.contiguous(),
        "in_index": torch.cat(idx_all).to(torch.int32),
        "groups": torch.tensor(table, dtype=torch.int64).view(-1, 5),
        "out_channel": out_channel.to(torch.int32),
        "channel_filter": channel_filter,
        "meta": torch.tensor([FORMAT_VERSION, tile, kh, kw], dtype=torch.int64),
    }


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _check_grad(x: torch.Tensor) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("sgdet native kernels are inference-only (no autograd): call them "
                           "under torch.no_grad() / torch.inference_mode()")


def conv2d(x, packed, stride=(1, 1), padding=(0, 0), dilation=(1, 1), out_channels=None,
           relu=False, residual=None, variant=0) -> torch.Tensor:
    """The packed layer on x [N, C_in, H, W] (float32): [N, out_channels, H_out, W_out],
    relu(conv + bias (+ residual)) with the packed BN folded in. ``variant``: tile shape 0..3.
    CUDA tensors (float32/16/bfloat16, packed moved by ``cuda.to_device``) run the Triton kernel."""
    _require(x)
    _check_grad(x)
    width = packed["channel_filter"].shape[0] if out_channels is None else int(out_channels)
    return torch.ops.sgdet.diverse_conv2d(
        x, packed["weight"], packed["bias"], packed["in_index"], packed["groups"],
        packed["out_channel"], _pair(stride), _pair(padding), _pair(dilation), width,
        bool(relu), residual, int(variant))


def linear(x, packed, relu=False, variant=0) -> torch.Tensor:
    """The packed linear layer (1x1 weights) on x [..., in_features]: [..., out_features]."""
    _require(x)
    _check_grad(x)
    width = packed["channel_filter"].shape[0]
    flat = x.reshape(-1, x.shape[-1])
    y = torch.ops.sgdet.diverse_linear(
        flat, packed["weight"], packed["bias"], packed["in_index"], packed["groups"],
        packed["out_channel"], width, bool(relu), int(variant))
    return y.reshape(*x.shape[:-1], width)


def has_norm_relu_gather() -> bool:
    """Whether the CPU extension's sgdet::norm_relu_gather is loaded."""
    return _reason is None and _has_norm_gather


def norm_relu_gather(features, index, scale, shift, relu=True) -> torch.Tensor:
    """relu(cat(features, 1)[:, index] * scale + shift) in one pass, without the concatenation
    (a DenseNet layer's cat + eval-mode norm1 + relu1). ``features``: float32 CPU maps
    [N, C_i, H, W]; ``index``: int64 channel numbers of the concatenation; ``scale``, ``shift``:
    float32, one per index."""
    _require(features[0])
    _check_grad(features[0])
    return torch.ops.sgdet.norm_relu_gather(list(features), index, scale, shift, bool(relu))


def _register_python_side() -> None:
    """The ops' fake kernels and FLOP formulas (called once the ops exist: at import where the
    extension loaded, or by the Triton module where it defines the ops itself)."""
    try:
        @torch.library.register_fake("sgdet::diverse_conv2d")
        def _conv2d_fake(x, weight, bias, in_index, groups, out_channel, stride, padding,
                         dilation, out_channels, relu, residual, variant):
            from .cuda import output_format       # the CUDA kernel keeps a channels_last input's layout
            kh, kw = weight.shape[0], weight.shape[1]
            ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
            wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
            return torch.empty((x.shape[0], out_channels, ho, wo), dtype=x.dtype, device=x.device,
                               memory_format=output_format(x))

        @torch.library.register_fake("sgdet::diverse_linear")
        def _linear_fake(x, weight, bias, in_index, groups, out_channel, out_features, relu,
                         variant):
            return x.new_empty((x.shape[0], out_features))

        if hasattr(torch.ops.sgdet, "norm_relu_gather"):   # the CPU extension's op only
            @torch.library.register_fake("sgdet::norm_relu_gather")
            def _norm_gather_fake(features, index, scale, shift, relu):
                first = features[0]
                return first.new_empty((first.shape[0], index.shape[0], first.shape[2], first.shape[3]))
    except RuntimeError:   # already registered (module reloaded)
        pass


_flops_registered = False


def _register_flop_formulas() -> None:
    """torch's FlopCounterMode counts what these ops run (2 FLOPs per multiply-accumulate), so
    sgdet.count and torch agree on natively deployed models too. Registered when the first layer
    is packed, not at import: torch.utils.flop_counter imports triton, which ``import sgdet``
    must not pay for."""
    global _flops_registered
    if _flops_registered:
        return
    _flops_registered = True
    from torch.utils.flop_counter import register_flop_formula

    try:
        @register_flop_formula(torch.ops.sgdet.diverse_conv2d)
        def _conv2d_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
            positions = out_shape[0] * out_shape[2] * out_shape[3]
            return 2 * positions * _numel(weight_shape)

        @register_flop_formula(torch.ops.sgdet.diverse_linear)
        def _linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * out_shape[0] * _numel(weight_shape)
    except (RuntimeError, ValueError):   # already registered (module reloaded)
        pass


_has_norm_gather = _reason is None and hasattr(torch.ops.sgdet, "norm_relu_gather")
if _reason is None:
    _register_python_side()
    _forced = os.environ.get("SGDET_NATIVE_ISA", "").strip()
    if _forced and _forced != "auto":
        try:
            set_isa(_forced)
        except ValueError as exc:
            warnings.warn(f"SGDET_NATIVE_ISA ignored: {exc}", RuntimeWarning, stacklevel=2)
