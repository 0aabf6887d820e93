"""Every collective of the project goes through this module: valid under NCCL and gloo, no-ops in one process.

    from model import comm
    comm.barrier()                                        # every rank (no-op without a process group)
    stop = comm.any_rank(flag)                            # True everywhere if True anywhere
    total, count = comm.all_reduce_values([loss, n], group=dp_group)
    comm.all_reduce(grad, group=tp_group)                 # in place, a device tensor
    value = comm.broadcast_object(value)                  # rank 0's Python object on every rank
    parts = comm.all_gather(shard, group=tp_group)        # list of every rank's tensor
    kv = comm.gather_along_dim(k, dim=1, group=cp_group)  # differentiable: backward reduce-scatters

Why one place: NCCL reduces only CUDA tensors, gloo only CPU ones, and a host value (a flag, a loss, a token
count) is easy to all-reduce on the wrong device: the CPU ``int32`` tensor of the pre-emption check did that on
NCCL, which stops every multi-GPU run at its first step. Here a tensor goes to a device the group's backend
accepts (``collective_device``) and comes back; on CUDA ``train.topology`` starts the default group as
``"cuda:nccl,cpu:gloo"``, so host values and Python objects travel over the gloo side of the same group without a
round trip through the GPU, and device tensors over NCCL. ``tests/unit/test_collectives_in_one_place.py`` scans
the source tree and fails on any ``torch.distributed`` collective called outside this module.

This is the bottom of the import graph (torch only): model/, data_pipeline/, train/, rlhf/, launch/ and the
benchmarks may all import it. Third-party libraries (DeepSpeed, megatron-core) keep their own communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ReduceOp = dist.ReduceOp
_OPS = {"sum": ReduceOp.SUM, "max": ReduceOp.MAX, "min": ReduceOp.MIN, "product": ReduceOp.PRODUCT}


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (default: every rank); 1 without a process group."""
    return dist.get_world_size(group) if initialized() else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group``; 0 without a process group."""
    return dist.get_rank(group) if initialized() else 0


def is_multi(group: Any = None) -> bool:
    """Whether ``group`` has more than one rank (collectives over it do something)."""
    return world_size(group) > 1


def accepts_cpu(group: Any = None) -> bool:
    """Whether ``group``'s backend reduces CPU tensors: gloo, MPI, or a device map with a ``cpu:`` entry
    (``"cuda:nccl,cpu:gloo"``); plain NCCL does not."""
    backend = str(dist.get_backend(group))
    if ":" in backend:
        return any(part.split(":")[0].strip() == "cpu" for part in backend.split(","))
    return backend != "nccl"


def collective_device(tensor: Tensor, group: Any = None) -> torch.device:
    """A device on which ``group`` can reduce ``tensor``: its own when the backend takes it, else the current
    CUDA device (NCCL)."""
    if tensor.device.type == "cpu" and not accepts_cpu(group):
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _op(op: str | Any) -> Any:
    return _OPS[op] if isinstance(op, str) else op


# ---------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------
def all_reduce(tensor: Tensor, *, op: str | Any = "sum", group: Any = None) -> Tensor:
    """Reduce ``tensor`` over ``group`` in place (``op``: "sum", "max", "min", "product" or a ``ReduceOp``) and
    return it. A CPU tensor on an NCCL-only group makes a round trip through the current CUDA device."""
    if not is_multi(group):
        return tensor
    device = collective_device(tensor, group)
    if device == tensor.device:
        dist.all_reduce(tensor, op=_op(op), group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=_op(op), group=group)
    tensor.copy_(moved)
    return tensor


def all_reduce_values(values: Sequence[float], *, op: str | Any = "sum", group: Any = None) -> list[float]:
    """Host numbers (losses, counts) reduced over ``group``, in fp64 (exact for counts up to 2^53)."""
    if not is_multi(group):
        return [float(v) for v in values]
    return all_reduce(torch.tensor([float(v) for v in values], dtype=torch.float64), op=op, group=group).tolist()


def any_rank(flag: bool, *, group: Any = None) -> bool:
    """True on every rank of ``group`` if it is true on any (pre-emption signals reach ranks at different times)."""
    if not is_multi(group):
        return flag
    return bool(all_reduce(torch.tensor([1 if flag else 0], dtype=torch.int32), op="max", group=group).item())


def all_gather(tensor: Tensor, *, group: Any = None) -> list[Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in rank order, on ``tensor``'s device."""
    if not is_multi(group):
        return [tensor]
    device = collective_device(tensor, group)
    local = tensor.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [p.to(tensor.device) for p in parts]


def reduce_scatter(tensor: Tensor, *, dim: int, group: Any = None) -> Tensor:
    """Sum ``tensor`` over ``group`` and return this rank's ``1/world`` slice of the sum along ``dim``."""
    if not is_multi(group):
        return tensor
    device = collective_device(tensor, group)
    parts = [p.contiguous() for p in tensor.to(device).chunk(world_size(group), dim=dim)]
    out = torch.empty_like(parts[rank(group)])
    dist.reduce_scatter(out, parts, group=group)
    return out.to(tensor.device)


class _GatherAlongDim(torch.autograd.Function):
    """All-gather along ``dim`` (ranks in order); backward reduce-scatters the gradient (each rank's input
    receives the sum over ranks of the gradient of its slice). Context parallelism's K/V gather, sequence
    parallelism's gather before a column-parallel matmul."""

    @staticmethod
    def forward(ctx, tensor: Tensor, dim: int, group: Any) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return torch.cat(all_gather(tensor, group=group), dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return reduce_scatter(grad.contiguous(), dim=ctx.dim, group=ctx.group), None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    """Sum over ranks and keep this rank's slice along ``dim``; backward all-gathers the gradient (sequence
    parallelism's replacement for the all-reduce after a row-parallel matmul)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, dim: int, group: Any) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return reduce_scatter(tensor.contiguous(), dim=dim, group=group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return torch.cat(all_gather(grad.contiguous(), group=ctx.group), dim=ctx.dim), None, None


def gather_along_dim(tensor: Tensor, *, dim: int, group: Any = None) -> Tensor:
    """Differentiable all-gather along ``dim`` (backward: reduce-scatter); identity in a group of one."""
    return _GatherAlongDim.apply(tensor, dim, group) if is_multi(group) else tensor


def reduce_scatter_along_dim(tensor: Tensor, *, dim: int, group: Any = None) -> Tensor:
    """Differentiable reduce-scatter along ``dim`` (backward: all-gather); identity in a group of one."""
    return _ReduceScatterAlongDim.apply(tensor, dim, group) if is_multi(group) else tensor


# ---------------------------------------------------------------------------------------------------
# Synchronisation and small Python objects
# ---------------------------------------------------------------------------------------------------
def barrier(group: Any = None) -> None:
    """Wait until every rank of ``group`` arrives (no-op in one process)."""
    if is_multi(group):
        dist.barrier(group=group)


def broadcast_object(obj: Any, *, src: int = 0, group: Any = None) -> Any:
    """Global rank ``src``'s ``obj`` (picklable, small) on every rank of ``group``."""
    if not is_multi(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, *, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (picklable, small: verdicts, file records) on every rank, in rank order."""
    if not is_multi(group):
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, *, dst: int = 0, group: Any = None) -> list[Any] | None:
    """Every rank's ``obj`` on global rank ``dst`` (a list in rank order), None on the others."""
    if not is_multi(group):
        return [obj]
    out: list[Any] | None = [None] * world_size(group) if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out
