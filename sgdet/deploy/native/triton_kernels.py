"""Deployment, native stage, GPU: the diverse-group conv and linear as one Triton kernel,
registered as the CUDA implementation of the torch ops the C++ CPU kernels implement
(``sgdet::diverse_conv2d`` / ``diverse_linear``): a native plan runs on the device its tensors
are on, through the same op, packed tensors and fake kernel. Imported lazily (``cuda.register``).

The kernel is an implicit GEMM per group: one program computes one tile of BLOCK_F filters of
one group on BLOCK_M output pixels (pixels run on across images, so 7x7 maps fill tiles). Its K
loop walks (tap, BLOCK_K input channels) steps and reads the channels through the group's index
list, so nothing is gathered into memory; the matrix units multiply in the activations' dtype
(float32, float16, bfloat16) and accumulate in float32. The store adds the packed bias (with the
folded BatchNorm), the residual, applies the ReLU and writes each filter to its output channel.

Packed format: the CPU op's, unchanged (``pack_conv``; ``cuda.to_device`` moves it and casts the
weight to the activations' dtype). Per group and tap its weights are a dense [k_g x o_g] block cut
into tiles of ``pack_tile()`` (24) filters, [tile][channel][filter in tile]; the kernel computes
each element's column from the group table (filter start, filters, index start, inputs, weight
column), so a GPU-only layout would buy only contiguity the gathered loads cannot use, at the
price of a second format and a device-dependent meaning of the same tensors. Output pixels and
strides are free: the kernel reads NCHW or channels_last input (and residual) as they come and
writes the output in the input's layout (``cuda.strided_format``); NCHW inputs are loaded with
the pixels innermost, channels_last ones with the channels innermost (coalesced either way).

Programs: axis 0 enumerates (pixel tile, filter tile) with the filter tiles of one pixel tile
adjacent (its input strip stays in L2 while every group reads it). A program finds its group
from the group table on the device (a prefix sum of the groups' tile counts), so a call needs no
host copy of the table and no sync; the grid holds the upper bound (F + G (BLOCK_F - 1)) /
BLOCK_F filter tiles per pixel tile, the few programs past a layer's real count return at once.

Not checked on the GPU (it would need a sync): index lists in range and a group table that adds
up; pack_conv builds them right, a damaged table is an illegal memory access, not an error.
fp32 matmuls follow torch's switches (TF32 where ``torch.backends.cudnn.allow_tf32`` lets a
dense conv use it, ``torch.backends.cuda.matmul.allow_tf32`` for linear layers).

Tests run this kernel on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``, set before the
kernel is defined) by calling ``conv2d`` / ``linear`` here directly, and on a GPU through the op."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _register_python_side, pack_tile
from .cuda import DTYPES, VARIANTS, strided_format

# The ops' schemas, as ops.cpp's TORCH_LIBRARY defines them; used only where the C++ extension
# is not built (the ops are then defined here, with the CUDA implementation alone).
CONV_SCHEMA = ("diverse_conv2d(Tensor x, Tensor weight, Tensor bias, Tensor in_index, Tensor groups, "
               "Tensor out_channel, int[2] stride, int[2] padding, int[2] dilation, int out_channels, "
               "bool relu, Tensor? residual, int variant) -> Tensor")
LINEAR_SCHEMA = ("diverse_linear(Tensor x, Tensor weight, Tensor bias, Tensor in_index, Tensor groups, "
                 "Tensor out_channel, int out_features, bool relu, int variant) -> Tensor")


@triton.jit
def _diverse_group_kernel(
        x_ptr, w_ptr, b_ptr, idx_ptr, grp_ptr, oc_ptr, res_ptr, out_ptr,
        H, W, Ho, Wo, M, G, w_cols, tiles,
        sxn, sxc, sxh, sxw, son, soc, soh, sow, srn, src, srh, srw,
        sh, sw, ph, pw, dh, dw,
        KH: tl.constexpr, KW: tl.constexpr, PACK: tl.constexpr,
        HAS_RES: tl.constexpr, RELU: tl.constexpr, PIX_LAST: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid % tiles
    pid_m = pid // tiles

    # the group and filter tile of this program: tiles are numbered group by group
    gs = tl.arange(0, BLOCK_G)
    sizes = tl.load(grp_ptr + gs * 5 + 1, mask=gs < G, other=0)
    counts = (sizes + BLOCK_F - 1) // BLOCK_F
    ends = tl.cumsum(counts, 0)
    if tile >= tl.sum(counts):
        return
    g = tl.sum((ends <= tile).to(tl.int32))
    first = tl.sum(tl.where(gs == g, ends - counts, 0))
    row = grp_ptr + g * 5
    fstart = tl.load(row).to(tl.int32)
    nf = tl.load(row + 1).to(tl.int32)
    istart = tl.load(row + 2).to(tl.int32)
    k = tl.load(row + 3).to(tl.int32)
    wcol = tl.load(row + 4).to(tl.int32)
    fl = (tile - first).to(tl.int32) * BLOCK_F + tl.arange(0, BLOCK_F)   # filters within the group
    fmask = fl < nf
    # packed weight of (filter fl, channel c) at tap t: t * w_cols + fcol + c * ftw
    ptile = fl // PACK
    ftw = tl.minimum(nf - ptile * PACK, PACK)
    fcol = wcol + ptile * (PACK * k) + fl % PACK

    # the output pixels of this program, across images
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    hw = Ho * Wo
    n = m // hw
    p = m - n * hw
    oh = p // Wo
    ow = p - oh * Wo
    xbase = n.to(tl.int64) * sxn
    ih0 = oh * sh - ph
    iw0 = ow * sw - pw
    kk = tl.arange(0, BLOCK_K)
    if PIX_LAST:
        acc = tl.zeros((BLOCK_F, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)

    # K loop: (tap, channel block) steps in one loop, so the pipeline runs across taps
    kb = (k + BLOCK_K - 1) // BLOCK_K
    for s in range(0, KH * KW * kb):
        t = s // kb
        c0 = (s - t * kb) * BLOCK_K
        ih = ih0 + (t // KW) * dh
        iw = iw0 + (t % KW) * dw
        ok = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xoff = xbase + ih * sxh + iw * sxw
        cc = c0 + kk
        cm = cc < k
        ch = tl.load(idx_ptr + istart + cc, mask=cm, other=0)
        coff = ch.to(tl.int64) * sxc
        wtap = w_ptr + t * w_cols + fcol
        if PIX_LAST:     # [BLOCK_F, BLOCK_M] += [BLOCK_F, BLOCK_K] @ [BLOCK_K, BLOCK_M]
            a = tl.load(x_ptr + (coff[:, None] + xoff[None, :]), mask=cm[:, None] & ok[None, :], other=0.0)
            b = tl.load(wtap[:, None] + cc[None, :] * ftw[:, None], mask=fmask[:, None] & cm[None, :],
                        other=0.0).to(a.dtype)
            if DOT_F32:
                acc = tl.dot(b.to(tl.float32), a.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(b, a, acc)
        else:            # [BLOCK_M, BLOCK_F] += [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_F]
            a = tl.load(x_ptr + (xoff[:, None] + coff[None, :]), mask=ok[:, None] & cm[None, :], other=0.0)
            b = tl.load(wtap[None, :] + cc[:, None] * ftw[None, :], mask=cm[:, None] & fmask[None, :],
                        other=0.0).to(a.dtype)
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, b, acc)

    # store: (conv + folded bias) + residual -> relu -> output channel of each filter
    bias = tl.load(b_ptr + fstart + fl, mask=fmask, other=0.0).to(tl.float32)
    oc = tl.load(oc_ptr + fstart + fl, mask=fmask, other=0).to(tl.int64)
    n64 = n.to(tl.int64)
    opix = n64 * son + oh * soh + ow * sow
    if PIX_LAST:
        y = acc + bias[:, None]
        offs = oc[:, None] * soc + opix[None, :]
        keep = fmask[:, None] & mmask[None, :]
        if HAS_RES:
            roffs = oc[:, None] * src + (n64 * srn + oh * srh + ow * srw)[None, :]
            y += tl.load(res_ptr + roffs, mask=keep, other=0.0).to(tl.float32)
    else:
        y = acc + bias[None, :]
        offs = opix[:, None] + oc[None, :] * soc
        keep = mmask[:, None] & fmask[None, :]
        if HAS_RES:
            roffs = (n64 * srn + oh * srh + ow * srw)[:, None] + oc[None, :] * src
            y += tl.load(res_ptr + roffs, mask=keep, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=keep)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fail(what: str, message: str):
    raise RuntimeError(f"sgdet triton {what}: {message}")


def _check_tables(what, x, weight, bias, in_index, groups, out_channel, variant) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        _fail(what, "the kernels are inference-only (no autograd): call them under "
                    "torch.no_grad() / torch.inference_mode()")
    if x.dtype not in DTYPES:
        _fail(what, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dim() != 3 or not weight.is_floating_point():
        _fail(what, "packed weight must be a float tensor [kh, kw, cols]")
    if bias.dim() != 1 or not bias.is_floating_point():
        _fail(what, "packed bias must be a float vector [F]")
    if in_index.dtype != torch.int32 or groups.dtype != torch.int64 or out_channel.dtype != torch.int32:
        _fail(what, "in_index and out_channel must be int32, groups int64 (as pack_conv makes them)")
    if groups.dim() != 2 or groups.shape[1] != 5 or out_channel.numel() != bias.numel():
        _fail(what, "groups must be [G, 5] and out_channel one entry per filter")
    for name, t in (("weight", weight), ("bias", bias), ("in_index", in_index), ("groups", groups),
                    ("out_channel", out_channel)):
        if t.device != x.device:
            _fail(what, f"packed {name} is on {t.device}, x on {x.device} (move the packed dict)")
    if not 0 <= variant < len(VARIANTS):
        _fail(what, f"variant must be in 0..{len(VARIANTS) - 1}, got {variant}")


def _launch(x, x_strides, weight, bias, in_index, groups, out_channel, out, out_strides,
            residual, res_strides, hw, out_hw, geometry, relu, variant, precision, pix_last) -> None:
    """Run the kernel: x [N, C, H, W] given by its strides, out [N, Cout, Ho, Wo] likewise."""
    block_m, block_f, block_k, warps, stages = VARIANTS[variant]
    num_groups, filters = groups.shape[0], bias.numel()
    n_images = x.shape[0]
    pixels = n_images * out_hw[0] * out_hw[1]
    if num_groups == 0 or filters == 0 or pixels == 0:
        return
    tiles = (filters + num_groups * (block_f - 1)) // block_f     # >= the real filter tile count
    grid = (tiles * triton.cdiv(pixels, block_m),)
    dot_f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpreting())
    _diverse_group_kernel[grid](
        x, weight.contiguous(), bias.contiguous(), in_index.contiguous(), groups.contiguous(),
        out_channel.contiguous(), out if residual is None else residual, out,
        hw[0], hw[1], out_hw[0], out_hw[1], pixels, num_groups, weight.shape[2], tiles,
        *x_strides, *out_strides, *res_strides, *geometry,
        KH=weight.shape[0], KW=weight.shape[1], PACK=pack_tile(), HAS_RES=residual is not None,
        RELU=bool(relu), PIX_LAST=pix_last, DOT_F32=dot_f32, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_K=block_k,
        BLOCK_G=max(2, triton.next_power_of_2(num_groups)), num_warps=warps, num_stages=stages)


def conv2d(x, weight, bias, in_index, groups, out_channel, stride, padding, dilation,
           out_channels, relu, residual, variant) -> torch.Tensor:
    """``sgdet::diverse_conv2d`` on the GPU (or, in Triton's interpreter, on CPU tensors): the
    arguments of the op, the packed tensors of pack_conv on x's device."""
    what = "conv"
    _check_tables(what, x, weight, bias, in_index, groups, out_channel, variant)
    if x.dim() != 4:
        _fail(what, "x must be [N, C, H, W]")
    stride, padding, dilation = ([int(v) for v in p] for p in (stride, padding, dilation))
    if min(stride + dilation) < 1 or min(padding) < 0:
        _fail(what, "need stride >= 1, dilation >= 1, padding >= 0")
    kh, kw = weight.shape[0], weight.shape[1]
    n_images, _, height, width = x.shape
    ho = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        _fail(what, "the output would be empty")
    width_out = bias.numel() if out_channels < 0 else int(out_channels)
    if width_out < bias.numel():
        _fail(what, f"{bias.numel()} filters do not fit {width_out} output channels")
    fmt = strided_format(x)       # on CUDA tensors: cuda.output_format, as the fake kernel says
    out = torch.empty((n_images, width_out, ho, wo), device=x.device, dtype=x.dtype, memory_format=fmt)
    if residual is not None:
        if tuple(residual.shape) != tuple(out.shape) or not residual.is_floating_point() or residual.device != x.device:
            _fail(what, f"residual must be a float tensor on {x.device} shaped like the output {list(out.shape)}")
    if width_out > bias.numel():     # channels no filter writes: zero, or the residual (relu'd)
        if residual is not None:
            out.copy_(residual)
        else:
            out.zero_()
        if relu:
            out.relu_()
    precision = "tf32" if torch.backends.cudnn.allow_tf32 and x.dtype == torch.float32 else "ieee"
    _launch(x, x.stride(), weight, bias, in_index, groups, out_channel, out, out.stride(), residual,
            residual.stride() if residual is not None else (0, 0, 0, 0), (height, width), (ho, wo),
            (*stride, *padding, *dilation), relu, variant, precision,
            pix_last=fmt != torch.channels_last)
    return out


def linear(x, weight, bias, in_index, groups, out_channel, out_features, relu, variant) -> torch.Tensor:
    """``sgdet::diverse_linear`` on the GPU: x [N, in_features] as N one-pixel images (channels
    innermost), weights 1x1."""
    what = "linear"
    _check_tables(what, x, weight, bias, in_index, groups, out_channel, variant)
    if x.dim() != 2:
        _fail(what, "x must be [N, in_features]")
    if weight.shape[0] != 1 or weight.shape[1] != 1:
        _fail(what, "the packed weights are not 1x1")
    if out_features < bias.numel():
        _fail(what, f"{bias.numel()} filters do not fit {out_features} outputs")
    out = (torch.zeros if out_features > bias.numel() else torch.empty)(
        (x.shape[0], int(out_features)), device=x.device, dtype=x.dtype)
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and x.dtype == torch.float32 else "ieee"
    _launch(x, (x.stride(0), x.stride(1), 0, 0), weight, bias, in_index, groups, out_channel, out,
            (out.stride(0), out.stride(1), 0, 0), None, (0, 0, 0, 0), (1, 1), (1, 1),
            (1, 1, 0, 0, 1, 1), relu, variant, precision, pix_last=False)
    return out


_libraries: list = []     # kept alive: dropping a Library object unregisters its kernels


def register() -> None:
    """Register ``conv2d`` / ``linear`` as the CUDA kernels of the sgdet ops (once). Where the
    C++ extension is not built the ops do not exist yet: they are defined here (same schemas,
    fake kernels and FLOP formulas from sgdet.deploy.native), with no CPU kernel."""
    if _libraries:
        return
    try:
        torch.ops.sgdet.diverse_conv2d.default
        defined = True
    except (AttributeError, RuntimeError):
        defined = False
    library = torch.library.Library("sgdet", "FRAGMENT")
    if not defined:
        library.define(CONV_SCHEMA)
        library.define(LINEAR_SCHEMA)
        _register_python_side()
    library.impl("diverse_conv2d", conv2d, "CUDA")
    library.impl("diverse_linear", linear, "CUDA")
    _libraries.append(library)
