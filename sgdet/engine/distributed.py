"""Engine stage: torch.distributed for the Trainer of every pipeline: one process per device, started by
``torchrun`` (or several nodes of it), or a plain single process when the torchrun variables are
absent. gloo on CPU, nccl on CUDA. Every helper is a no-op (or the identity) in a single process,
so the engine calls them unconditionally. ``sync_structure`` makes the groups and masks of a pruning
step identical on every rank."""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist

from sgdet.errors import ConfigError

log = logging.getLogger("sgdet.engine")

_ENV = ("RANK", "WORLD_SIZE")


@dataclass
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None       # None: no process group (single process)
    cpu_group: Any = None            # a gloo group for small CPU-side collectives under nccl
    run_id: str | None = None        # set by the session (rank 0 holds OUTPUT_DIR's run lock)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """cfg.DEVICE (auto | cpu | cuda) as a torch.device; ``cuda`` without a GPU is a ConfigError."""
    name = str(name).lower()
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"DEVICE must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("DEVICE is cuda but no CUDA device is available (use DEVICE cpu or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in _ENV)


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT), or return a single-process context when those variables are absent."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    target = resolve_device(device, local_rank)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        import inspect
        takes_device = "device_id" in inspect.signature(dist.init_process_group).parameters
        kwargs = {"device_id": target} if target.type == "cuda" and takes_device else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=target,
                       backend=backend, cpu_group=cpu_group)


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_sum(values: Iterable[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (float64)."""
    values = [float(v) for v in values]
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_min(value: int, ctx: DistContext) -> int:
    """The smallest ``value`` over all ranks, through CPU (gloo) so no GPU stream is synchronised."""
    if not ctx.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    if ctx.cpu_group is None and ctx.backend != "gloo":
        t = t.to(ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.cpu_group)
    return int(t.item())


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_tensor_(tensor: torch.Tensor, ctx: DistContext, src: int = 0) -> None:
    """Overwrite ``tensor`` in place with rank ``src``'s copy (bool tensors travel as uint8)."""
    if not ctx.distributed:
        return
    if tensor.dtype == torch.bool:
        carrier = tensor.to(torch.uint8)
        dist.broadcast(carrier, src=src)
        tensor.copy_(carrier.bool())
    else:
        dist.broadcast(tensor, src=src)


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A short hash of the exact contents of ``tensors`` (to compare state across ranks)."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def sync_structure(layers: dict, ctx: DistContext, t: int = 0) -> str:
    """Make groups, masks and SG weights identical on every rank after a pruning step. Each rank
    ran the same deterministic k-means on identical weights (DDP keeps them in sync); rank 0's
    groups, masks and weights are broadcast anyway, then every rank's fingerprint of its groups
    and masks is compared (a mismatch raises). Returns the fingerprint."""
    before = all_gather_object(_structure_fingerprint(layers), ctx)
    if not ctx.distributed:
        return before[0]
    for layer in layers.values():
        broadcast_tensor_(layer.group, ctx)
        broadcast_tensor_(layer.mask, ctx)
        broadcast_tensor_(layer.weight.data, ctx)
        layer.zero_pruned_()
    after = all_gather_object(_structure_fingerprint(layers), ctx)
    if len(set(before)) > 1:
        log.warning("step %d: ranks computed different groupings %s; using rank 0's", t, before)
    if len(set(after)) > 1:
        raise RuntimeError(f"step {t}: groups/masks still differ across ranks after broadcast: {after}")
    log.info("step %d: groups and masks identical on all %d ranks (fingerprint %s)", t,
             ctx.world_size, after[0])
    return after[0]


def _structure_fingerprint(layers: dict) -> str:
    return fingerprint([t for m in layers.values() for t in (m.group, m.mask)])
