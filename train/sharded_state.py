"""Each rank's share of the training state, read and written without gathering: its ZeRO fragment of its TP slice.

    from train.sharded_state import fragment_range, read_fragment, write_fragment
    start, stop = fragment_range(param)              # elements of the flattened TP slice this rank's optimizer owns
    master = read_fragment(param)                    # fp32 master weights of that range (a host copy)
    write_fragment(param, value, "exp_avg")          # restore Adam's first moment for that range
    assign_parameter(param, value)                   # before DeepSpeed: the weight (ZeRO-3: this rank's partition)

DeepSpeed keeps the fp32 master weights and Adam moments of a parameter split over the data-parallel group:
- ZeRO-1/2: all parameters of a group are flattened and the flat buffer is cut into equal partitions, so one
  parameter's elements ``[start, start + numel)`` on this rank are ``param._hp_mapping.lp_fragment_address``
  and ``_hp_mapping.get_hp_fragment(key)`` is a view of them (a parameter may have no fragment on a rank);
- ZeRO-3: every parameter is partitioned on its own: rank ``r`` of its group holds elements
  ``[r * p, (r + 1) * p)`` (``p = param.ds_tensor.ds_numel``, the last rank padded), and the optimizer's
  local-partition API reads and writes them.
Nothing here runs a collective: a rank saves and restores exactly what it owns (``train/portable.py`` stores
it as one fragment per parameter per rank, and reads any other layout's slices back).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero3(param: Any) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def fragment_range(param: Any) -> tuple[int, int] | None:
    """``[start, stop)`` of the flattened TP slice whose optimizer state lives on this rank (None: nothing)."""
    if _zero3(param):
        size = int(param.ds_tensor.ds_numel)
        rank = dist.get_rank(group=param.ds_process_group) if dist.is_initialized() else 0
        start, stop = rank * size, min((rank + 1) * size, int(param.ds_numel))
        return (start, stop) if start < stop else None
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    return (int(address.start), int(address.start) + int(address.numel)) if address.numel else None


def read_fragment(param: Any, key: str | None = None) -> Tensor:
    """A host copy (fp32, 1-D) of this rank's fragment: master weights (``key=None``) or an Adam moment."""
    start, stop = fragment_range(param) or (0, 0)
    if _zero3(param):
        owner = param._z3_optimizer
        local = owner.get_local_fp32_param(param, key) if key else owner.get_local_fp32_param(param)
        value = local.reshape(-1)[: stop - start]
    else:
        value = param._hp_mapping.get_hp_fragment(key).reshape(-1)
    return value.detach().float().cpu().clone()


def write_fragment(param: Any, value: Tensor, key: str | None = None) -> None:
    """Set this rank's fragment of the master weights (``key=None``) or of an Adam moment."""
    if _zero3(param):
        size = int(param.ds_tensor.ds_numel)
        padded = torch.zeros(size, dtype=torch.float32, device=value.device)
        padded[: value.numel()].copy_(value.reshape(-1))
        param._z3_optimizer.set_local_hp_param(padded.to(param.ds_tensor.device), param, key)
        return
    target = param._hp_mapping.get_hp_fragment(key)
    target.data.copy_(value.reshape(-1).to(target.device, target.dtype))


@torch.no_grad()
def create_zero3_optimizer_state(zero_optimizer: Any) -> bool:
    """ZeRO-3: materialise Adam's lazily created state of every sub-group with a zero-LR, zero-gradient step.

    Stage 3 keeps its base optimizer's ``param_groups[...]["params"]`` empty between steps and puts one
    sub-group's flat fp32 partition in only while stepping it, so a plain ``optimizer.step()`` creates nothing
    and a resume (which writes the moments) finds no ``exp_avg``. Returns False for other optimizers.
    """
    flat = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    to_group = getattr(zero_optimizer, "sub_group_to_group_id", None)
    if flat is None or to_group is None:
        return False
    base = zero_optimizer.optimizer
    for sub_group, fp32 in enumerate(flat):
        group = base.param_groups[to_group[sub_group]]
        saved_params, saved_lr = group["params"], group["lr"]
        group["params"], group["lr"] = [fp32], 0.0
        fp32.grad = torch.zeros_like(fp32)
        try:
            base.step()  # lr 0: AdamW's update and its decoupled weight decay both leave the weights unchanged
        finally:
            group["params"], group["lr"] = saved_params, saved_lr
            fp32.grad = None
    return True


@torch.no_grad()
def assign_parameter(param: Any, value: Tensor) -> None:
    """Set a parameter to ``value`` (its whole TP slice): a plain copy, or, for a ZeRO-3 parameter built
    partitioned (``train.parallelize.partitioned_construction``), only this rank's partition of it."""
    if not _zero3(param):
        param.copy_(value)
        return
    if tuple(value.shape) != tuple(param.ds_shape):
        raise ValueError(f"assign_parameter: value of shape {tuple(value.shape)} for a parameter of shape "
                         f"{tuple(param.ds_shape)}")
    start, stop = fragment_range(param) or (0, 0)
    write_lp_fragment(param, value.reshape(-1)[start:stop])


def parameter_shape(param: Any) -> tuple[int, ...]:
    """A parameter's shape (its TP slice), also when ZeRO-3 holds only a partition (``param.shape`` is then 0)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def write_lp_fragment(param: Any, value: Tensor) -> None:
    """ZeRO-3: set this rank's partition of the module (low-precision) weight from its fp32 fragment."""
    size = int(param.ds_tensor.ds_numel)
    param.ds_tensor.data.reshape(-1)[: value.numel()].copy_(value.reshape(-1).to(param.ds_tensor.dtype))
    if value.numel() < size:
        param.ds_tensor.data.reshape(-1)[value.numel():].zero_()
