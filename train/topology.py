"""Process topology: one object owning the tensor-, context-, data- and pipeline-parallel sizes, ranks and groups.

    from train.topology import Topology
    topo = Topology.initialize(tp=2, cp=2, pp=2, timeout_s=600)   # under torchrun; or a plain process (world 1)
    topo.tp_group, topo.cp_group, topo.dp_rank, topo.dp_cp_group, topo.is_last_stage, topo.deepspeed_mpu()

Rank layout is Llama 3's [TP, CP, PP, DP] (innermost first; ``RANK_ORDER``, ``grid_coordinates``): TP on
adjacent ranks (a TP group stays inside one node's NVLink domain), then CP (context parallelism,
``model/context_parallel.py``: its K/V all-gathers next), then PP (point-to-point activations), and DP outermost
(one gradient reduction per step, the most latency-tolerant traffic, on the network). megatron-core builds its
groups in that order (``parallel_state`` ``order="tp-cp-ep-pp-dp"``) and DeepSpeed's pipeline grid gets the
same mapping (``pipeline_grid``: its "data" axis is DP x CP), so both libraries agree on who is whose peer;
``launch/planner.py`` models the links this way.

Groups: ``dp_group`` holds the ranks that read different data (the loader shards over it); CP ranks read the
same sequences and each keeps its chunks. ``dp_cp_group`` (DP x CP) holds the ranks whose weights are identical:
the gradient reduction, ZeRO's partitions, the loss and token counts, and the checkpoint fragments span it.

The default process group: NCCL for CUDA tensors with a gloo side for CPU ones (``"cuda:nccl,cpu:gloo"``)
when CUDA is available, otherwise gloo. A plain ``python`` process with no
launcher gets a one-process gloo group on a free localhost port, so the same code path (DeepSpeed engine,
megatron layers) runs everywhere. Every group carries ``timeout_s``: a collective that hangs fails with
an error the loop turns into a message naming the rank and the operation.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from train.config import ConfigError

RANK_ORDER = ("tp", "cp", "pp", "dp")
"""Innermost first: global rank = tp + TP x (cp + CP x (pp + PP x dp)) (Llama 3's [TP, CP, PP, DP])."""
MEGATRON_ORDER = "tp-cp-ep-pp-dp"
"""The same order for megatron-core's ``initialize_model_parallel`` (expert parallelism is 1 here)."""


def grid_coordinates(rank: int, *, tp: int, cp: int, pp: int, dp: int) -> dict[str, int]:
    """``{"tp", "cp", "pp", "dp"}`` coordinates of global ``rank`` in the [TP, CP, PP, DP] grid."""
    if not 0 <= rank < tp * cp * pp * dp:
        raise ValueError(f"rank {rank} outside a world of tp x cp x pp x dp = {tp * cp * pp * dp}")
    coords = {}
    for name, size in zip(RANK_ORDER, (tp, cp, pp, dp)):
        rank, coords[name] = divmod(rank, size)
    return coords


def grid_rank(*, tp: int, cp: int, pp: int, dp: int, sizes: tuple[int, int, int, int]) -> int:
    """The global rank at coordinates (tp, cp, pp, dp) of a grid of ``sizes`` (TP, CP, PP, DP)."""
    t, c, p, _ = sizes
    return tp + t * (cp + c * (pp + p * dp))


def pipeline_grid(*, tp: int, cp: int, pp: int, dp: int) -> Any:
    """DeepSpeed's pipeline topology over our rank order: axes pipe, data (DP x CP, data index dp x CP + cp, the
    ``Topology.dp_cp_rank``), model (TP). DeepSpeed's own ``PipeModelDataParallelTopology`` lays ranks out
    row-major (pipe outermost); here its mapping is replaced by ours, which every method of its
    ``ProcessTopology`` reads."""
    from train.deepspeed_api import ProcessTopology

    grid = ProcessTopology(axes=["pipe", "data", "model"], dims=[pp, dp * cp, tp])
    grid.mapping = {grid.ProcessCoord(pipe=p, data=d, model=m):
                    grid_rank(tp=m, cp=d % cp, pp=p, dp=d // cp, sizes=(tp, cp, pp, dp))
                    for p in range(pp) for d in range(dp * cp) for m in range(tp)}
    return grid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_default_group(*, timeout_s: float) -> str:
    """Initialise ``torch.distributed`` from the torchrun/SLURM environment, or as a world of one."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        return "nccl" if "nccl" in str(dist.get_backend()) else str(dist.get_backend())
    if "WORLD_SIZE" not in os.environ:
        # A plain process: a world of one on localhost, set in the environment DeepSpeed reads too.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # On GPUs the default group pairs NCCL for device tensors with gloo for CPU ones: host flags, counters and
    # Python objects (model/comm.py) then never need a device round trip, and NCCL never sees a CPU tensor.
    init = "cuda:nccl,cpu:gloo" if backend == "nccl" else "gloo"
    dist.init_process_group(backend=init, timeout=datetime.timedelta(seconds=timeout_s))
    return backend


@dataclass
class Topology:
    """Sizes, ranks and groups of this process (see the module docstring)."""

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    global_rank: int
    world_size: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    backend: str
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: Any = None
    """None at CP 1 (``model.context_parallel.ContextParallel(None)`` is off)."""
    dp_cp_group: Any = None
    """DP x CP: gradient reduction, ZeRO partitions, loss sums; equals ``dp_group`` at CP 1."""

    @property
    def dp_cp_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def dp_cp_rank(self) -> int:
        """This rank's place in ``dp_cp_group`` (its ZeRO partition and checkpoint fragment index)."""
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @classmethod
    def initialize(cls, *, tp: int = 1, pp: int = 1, cp: int = 1, timeout_s: float = 600) -> Topology:
        """Create (or reuse) the default group and megatron-core's model-parallel groups."""
        backend = init_default_group(timeout_s=timeout_s)
        world = dist.get_world_size()
        if world % (tp * cp * pp):
            raise ConfigError(f"world size {world} is not a multiple of tp x cp x pp = {tp} x {cp} x {pp}; launch a "
                              f"multiple of {tp * cp * pp} processes (torchrun --nproc-per-node)")
        if parallel_state.model_parallel_is_initialized():
            if (parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size(),
                    parallel_state.get_context_parallel_world_size()) != (tp, pp, cp):
                parallel_state.destroy_model_parallel()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
                order=MEGATRON_ORDER,
                # No experts here; megatron-core still builds an expert grid (CP folded away) and asserts its
                # PP groups equal the dense ones, which with PP inside DP holds only if its TP spans TP x CP.
                expert_tensor_parallel_size=tp * cp,
                distributed_timeout_minutes=max(1, int(timeout_s // 60)),
                # With gloo as the default backend the extra gloo groups would only duplicate the others.
                create_gloo_process_groups=backend != "gloo")
        return cls(
            tp_size=tp, pp_size=pp, dp_size=world // (tp * cp * pp),
            cp_size=cp, cp_rank=parallel_state.get_context_parallel_rank(),
            cp_group=parallel_state.get_context_parallel_group() if cp > 1 else None,
            dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            global_rank=dist.get_rank(), world_size=world,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            pp_group=parallel_state.get_pipeline_model_parallel_group(),
            dp_group=parallel_state.get_data_parallel_group(),
            backend=backend)

    def deepspeed_mpu(self) -> DeepSpeedMPU:
        return DeepSpeedMPU(self)

    def describe(self) -> str:
        cp = f"cp {self.cp_rank}/{self.cp_size}, " if self.cp_size > 1 else ""
        return (f"rank {self.global_rank}/{self.world_size} (tp {self.tp_rank}/{self.tp_size}, {cp}"
                f"pp {self.pp_rank}/{self.pp_size}, dp {self.dp_rank}/{self.dp_size})")


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed asks for, mapped onto megatron-core's groups.

    DeepSpeed calls the tensor-parallel group "model parallel"; passing ``parallel_state`` itself fails
    (it has no ``get_model_parallel_world_size``). Used without pipeline parallelism; with PP, DeepSpeed's
    ``PipelineModule`` builds its own grid over the same rank order.
    """

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.tp_size

    def get_model_parallel_group(self) -> Any:
        return self.topo.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    # DeepSpeed's "data parallel" is every rank holding the same weights: DP x CP (context-parallel ranks
    # average their gradients and split ZeRO's partitions like data-parallel ones).
    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_cp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp_cp_size

    def get_data_parallel_group(self) -> Any:
        return self.topo.dp_cp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.topo.dp_cp_group)

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.topo.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.topo.pp_size

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.topo.pp_group
