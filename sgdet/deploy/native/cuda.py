"""Deployment, native stage, the GPU side that needs no Triton: whether the Triton kernel
(``triton_kernels.py``) can run, its tile variants, how packed tensors move to the GPU, and the
lazy registration. Importing this module never imports triton; ``register()`` does, the first
time a CUDA layer is packed for the native plan (``sgdet.deploy.plans.compile_native``) or a CUDA
tensor reaches ``sgdet.deploy.native.conv2d`` / ``linear``.

The GPU kernel is the CUDA implementation of the same torch ops as the C++ CPU kernels
(``sgdet::diverse_conv2d`` / ``diverse_linear``) and takes the same packed tensors
(``pack_conv``), moved to the GPU by ``to_device``: the weight in the activations' dtype (float32,
float16 or bfloat16), every table as packed."""
from __future__ import annotations

import importlib.util

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tile variants, index = the native plan's ``variant``: (output pixels per program BLOCK_M,
# filters per program BLOCK_F, input channels per K step BLOCK_K, warps, pipeline stages).
# Wide filter tiles suit wide groups; 16-filter tiles groups of a few filters (SG layers at
# g = 16 have 4-128 filters per group). Timed per layer like the CPU tile shapes.
VARIANTS = (
    (128, 64, 32, 4, 3),
    (64, 64, 32, 4, 3),
    (128, 32, 32, 4, 3),
    (64, 16, 32, 2, 3),
)

_failed: str | None = None     # why registration failed (set once)


def unavailable_reason() -> str | None:
    """One line saying why the Triton kernel cannot run here (None: it can, on CUDA tensors)."""
    if _failed is not None:
        return _failed
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (torch's CUDA wheels ship it: pip install triton)"
    return None


def available() -> bool:
    """Whether CUDA tensors can run the native plan (Triton present in a CUDA build of torch)."""
    return unavailable_reason() is None


def variants() -> list[tuple[int, int, int, int, int]]:
    """The GPU tile variants (BLOCK_M, BLOCK_F, BLOCK_K, warps, stages), index = ``variant``."""
    return list(VARIANTS)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel runs tensors of ``device`` and ``dtype`` (no CUDA needed to ask)."""
    return torch.device(device).type == "cuda" and dtype in DTYPES and available()


def strided_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last where ``x`` is laid out so (and not also NCHW-contiguous), else NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the ops write: a CUDA input's own (the Triton kernel takes any strides and
    writes channels_last for a channels_last input), NCHW on the CPU (the C++ kernel's only one).
    The fake kernels use it too, so torch.compile sees the strides the kernel returns."""
    return strided_format(x) if x.device.type == "cuda" else torch.contiguous_format


def register() -> None:
    """Import the Triton kernel and register it as the ops' CUDA implementation (once)."""
    global _failed
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"sgdet Triton kernel unavailable: {reason}")
    try:
        from . import triton_kernels
        triton_kernels.register()
    except Exception as exc:  # noqa: BLE001 - a broken triton install, an old torch
        _failed = f"registering the Triton kernel failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise RuntimeError(f"sgdet Triton kernel unavailable: {_failed}") from exc


def to_device(packed: dict[str, torch.Tensor], device: torch.device,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``packed`` (from pack_conv, on the CPU) on ``device``, its weight in ``dtype`` (what the
    GPU kernel's matrix units read: the activations' dtype), bias float32 (added in the
    float32 accumulator), the tables unchanged."""
    out = {name: t.to(device) for name, t in packed.items()}
    out["weight"] = packed["weight"].to(device=device, dtype=dtype).contiguous()
    return out
