"""Checkpoint cost of a layout: bytes each rank writes, the total, the training stall and the background write time.

    from launch.checkpoint_plan import Storage, checkpoint_cost
    cost = checkpoint_cost(get_config("llama2_70b"), Layout(tp=8, pp=8, dp=16, zero_stage=1), storage=Storage())
    cost.bytes_per_rank_max, cost.total_bytes, cost.stall_s, cost.write_s

What a checkpoint holds (``train/portable.py``): every rank writes its own ZeRO fragment of its pipeline stage's
TP slice, as fp32 master weights + Adam's two moments = 12 bytes per parameter it owns. ZeRO 1-3 partition those
over DP, so rank bytes = 12 x stage params / DP; TP-replicated tensors (the RMSNorm weights) are written by each
TP rank. Nothing else scales with the model (RNG and loop state are a few KB).

Time (``train/checkpointing.py``, asynchronous save):
- stall: what training waits for, the copy of the rank's shard from GPU to host memory (``host_copy_gbps`` per
  GPU; pinned PCIe Gen5 copies reach ~25 GB/s in practice); the host keeps that copy until written;
- write: the background write + fsync, limited by what one node can push to the filesystem
  (``node_write_gbps``) and by the filesystem's aggregate bandwidth shared by all nodes (``aggregate_gbps``);
  checkpoints must be spaced at least this far apart, or the next save waits for the previous one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from launch.planner import Layout, lora_params, split_layers, stage_params
from model.config import LlamaConfig

CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 master + exp_avg + exp_avg_sq


@dataclass(frozen=True)
class Storage:
    """The storage model the checkpoint times derive from (state the figures you plan with)."""

    node_write_gbps: float = 10.0
    """GB/s one node can write to the checkpoint filesystem (a Lustre/GPFS/NFS client: 5-25 GB/s)."""
    aggregate_gbps: float = 500.0
    """GB/s the whole filesystem sustains for all nodes together."""
    host_copy_gbps: float = 25.0
    """GB/s of one GPU's device-to-host copy into pinned memory (what training waits for)."""
    gpus_per_node: int = 8


@dataclass
class CheckpointCost:
    """One layout's checkpoint: bytes per rank (per pipeline stage, the largest, the smallest), total, times."""

    bytes_per_rank_by_stage: list[float]
    bytes_per_rank_max: float
    bytes_per_rank_min: float
    total_bytes: float
    host_bytes_per_node: float
    stall_s: float
    write_s: float
    storage: Storage

    def to_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["storage"] = dataclasses.asdict(self.storage)
        return out

    def describe(self) -> str:
        gb = 1e9
        return (f"checkpoint {self.total_bytes / gb:,.0f} GB in all, {self.bytes_per_rank_max / gb:.2f} GB on the "
                f"largest rank ({self.bytes_per_rank_min / gb:.2f} GB smallest); training stalls "
                f"{self.stall_s:.2f} s (device->host copy at {self.storage.host_copy_gbps:g} GB/s), the write "
                f"takes {self.write_s:.1f} s in the background ({self.storage.node_write_gbps:g} GB/s per node, "
                f"{self.storage.aggregate_gbps:g} GB/s filesystem)")


def rank_checkpoint_bytes(cfg: LlamaConfig, layout: Layout, stage: int) -> float:
    """Bytes one rank of pipeline stage ``stage`` writes (its ZeRO partition; at ZeRO-0 DP rank 0 writes all)."""
    # LoRA checkpoints hold the adapters only (the frozen base is the initial checkpoint's).
    params = lora_params(cfg, layout, stage) if layout.lora_rank else stage_params(cfg, layout, stage)
    owned = params / layout.shard_ranks if layout.zero_stage >= 1 else params  # ZeRO spans DP x CP
    return CHECKPOINT_BYTES_PER_PARAM * owned


def checkpoint_cost(cfg: LlamaConfig, layout: Layout, *, storage: Storage = Storage()) -> CheckpointCost:
    """Bytes and times of one checkpoint of ``cfg`` at ``layout`` (see the module docstring)."""
    per_stage = [rank_checkpoint_bytes(cfg, layout, s) for s in range(layout.pp)]
    writers_per_stage = layout.tp * (layout.shard_ranks if layout.zero_stage >= 1 else 1)
    total = sum(b * writers_per_stage for b in per_stage)
    # A node holds gpus_per_node consecutive ranks; the heaviest stage bounds the busiest node.
    per_node = max(per_stage) * min(storage.gpus_per_node, layout.gpus)
    nodes = max(1, math.ceil(layout.gpus / storage.gpus_per_node))
    write_s = max(per_node / (storage.node_write_gbps * 1e9), total / (storage.aggregate_gbps * 1e9))
    return CheckpointCost(
        bytes_per_rank_by_stage=per_stage, bytes_per_rank_max=max(per_stage), bytes_per_rank_min=min(per_stage),
        total_bytes=total, host_bytes_per_node=per_node if nodes else 0.0,
        stall_s=max(per_stage) / (storage.host_copy_gbps * 1e9), write_s=write_s, storage=storage)


def stages_description(cfg: LlamaConfig, layout: Layout) -> str:
    """``"10 + 10 + ... layers"``: which stage carries what (the first holds the embedding, the last the head)."""
    return " + ".join(str(n) for n in split_layers(cfg.n_layers, layout.pp)) + " layers"
