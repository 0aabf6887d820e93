"""Who does which evaluation request: data-parallel split, tensor-parallel lockstep, results gathered.

    from evaluation.parallel import EvalGroups
    groups = EvalGroups.from_topology(Topology.initialize(tp=2))   # under torchrun; EvalGroups() alone = 1 process
    mine = groups.my_share(costs)                                   # indices of the items this DP rank computes
    everything = groups.gather_by_index(mine, local_results)        # every rank gets all results, input order

Every rank of the job runs lm-eval's evaluator on the *whole* task (lm-eval sees one process: ``rank 0``,
``world_size 1``); the adapter splits the model work itself. Work items (contexts with their continuations,
rolling windows, generation prompts) are balanced over the data-parallel ranks by cost (longest first onto the
least-loaded rank, a pure function of the costs, so every rank computes the same plan without talking); the
ranks of one tensor-parallel group share a DP rank and therefore run the same batches in lockstep, as their
layers' collectives require. Results are gathered over the DP group at the end of each request type, so every
rank returns the same answers to lm-eval and the metrics, the log and the output file are those of one process.

The gather is the only collective here: ``model.comm.all_gather_object`` over the DP group (the project's one
place for collectives; on CUDA it travels over the gloo side of the ``cuda:nccl,cpu:gloo`` group).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from model import comm

T = TypeVar("T")


@dataclass(frozen=True)
class EvalGroups:
    """This process's data-parallel and tensor-parallel place; the defaults are a plain single process."""

    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None
    """The DP process group (``None`` with one DP rank)."""
    tp_size: int = 1
    tp_group: Any = None
    """The TP group whose ranks hold slices of the vocabulary (``None`` at TP 1)."""
    global_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_topology(cls, topo: Any) -> EvalGroups:
        """From ``train.topology.Topology`` (or anything with its fields)."""
        if getattr(topo, "pp_size", 1) != 1:
            raise ValueError(f"evaluation runs the model at pipeline-parallel size 1 (got pp={topo.pp_size}); "
                             "use tensor parallelism (--tp) and data parallelism for large models")
        return cls(dp_rank=topo.dp_rank, dp_size=topo.dp_size, dp_group=topo.dp_group if topo.dp_size > 1 else None,
                   tp_size=topo.tp_size, tp_group=topo.tp_group if topo.tp_size > 1 else None,
                   global_rank=topo.global_rank, device=topo.device)

    @property
    def is_output_rank(self) -> bool:
        """Global rank 0 writes files and prints."""
        return self.global_rank == 0

    def my_share(self, costs: Sequence[float]) -> list[int]:
        """Indices (ascending) of the items this DP rank computes; see ``balanced_split``."""
        return balanced_split(costs, parts=self.dp_size)[self.dp_rank]

    def gather_by_index(self, indices: Sequence[int], results: Sequence[T], *, total: int) -> list[T]:
        """Every rank's ``results`` (for its ``indices``) merged into one list of ``total`` items, input order."""
        local = list(zip(indices, results, strict=True))
        parts = comm.all_gather_object(local, group=self.dp_group) if self.dp_size > 1 else [local]
        merged: list[Any] = [None] * total
        seen = 0
        for part in parts:
            for index, value in part:
                merged[index] = value
                seen += 1
        if seen != total:
            raise RuntimeError(f"evaluation gather: {seen} results for {total} items; the DP ranks planned "
                               "different splits (did they receive different requests?)")
        return merged


def balanced_split(costs: Sequence[float], *, parts: int) -> list[list[int]]:
    """Split item indices into ``parts`` lists of near-equal total cost (largest first onto the lightest part).

    Deterministic (ties go to the lower part index, items of equal cost in index order), so every rank computes
    the same split from the same costs without communication.
    """
    if parts == 1:
        return [list(range(len(costs)))]
    heap = [(0.0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, part = heapq.heappop(heap)
        out[part].append(index)
        heapq.heappush(heap, (load + float(costs[index]), part))
    return [sorted(p) for p in out]


def init_groups(*, tp: int, timeout_s: float = 1800) -> EvalGroups:
    """``EvalGroups`` for this process: a plain one, or from ``train.topology.Topology`` under a launcher / TP."""
    if tp == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return EvalGroups(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from train.topology import Topology

    return EvalGroups.from_topology(Topology.initialize(tp=tp, pp=1, timeout_s=timeout_s))
