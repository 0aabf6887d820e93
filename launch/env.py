"""Where am I in the job? Rank, world size and rendezvous address from torchrun, SLURM or OpenMPI variables.

    from launch.env import read_dist_env
    env = read_dist_env()          # DistEnv(rank=3, local_rank=3, world_size=16, ..., source="torchrun")

Precedence: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``...) > SLURM (``SLURM_PROCID``...) > OpenMPI
(``OMPI_COMM_WORLD_*``) > a single process. torchrun wins because under ``srun torchrun`` both are set and
SLURM's describe the per-node torchrun task, not the worker. SLURM's compressed node lists
(``node[001-004,007]``) are parsed here so no ``scontrol`` is needed on a compute node.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"
    """Which launcher the values came from: torchrun, slurm, openmpi or single."""

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1-2,5],b3" -> ["a[1-2,5]", "b3"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_nodelist(nodelist: str) -> list[str]:
    """All hostnames of a SLURM node list: "node[001-003,007],gpu5" -> node001..node003, node007, gpu5.

    Zero padding is kept; several bracket groups in one name ("r[1-2]n[01-02]") expand as a product."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        match = re.search(r"\[([^\]]+)\]", part)
        if not match:
            hosts.append(part)
            continue
        head, tail = part[: match.start()], part[match.end():]
        for item in match.group(1).split(","):
            lo, _, hi = item.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"SLURM node list {nodelist!r}: cannot parse range {item!r}")
            for number in range(int(lo), int(hi or lo) + 1):
                hosts.extend(expand_nodelist(f"{head}{number:0{len(lo)}d}{tail}"))
    return hosts


def first_host(nodelist: str) -> str:
    """The first hostname of a SLURM node list, without expanding the rest."""
    part = _split_top_level(nodelist)[0]
    while "[" in part:
        match = re.search(r"\[([^\]]+)\]", part)
        assert match is not None
        first = match.group(1).split(",")[0].partition("-")[0]
        part = part[: match.start()] + first + part[match.end():]
    return part


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _port(env: Mapping[str, str]) -> int:
    return _int(env, "MASTER_PORT", DEFAULT_PORT)


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the distributed context from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "WORLD_SIZE", 1))
        return DistEnv(
            rank=_int(env, "RANK", 0), local_rank=_int(env, "LOCAL_RANK", 0),
            world_size=_int(env, "WORLD_SIZE", 1), local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", _int(env, "RANK", 0) // max(1, local_world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_port(env), source="torchrun",
        )
    if "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        world = _int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", 1))
        nodes = _int(env, "SLURM_NNODES", _int(env, "SLURM_JOB_NUM_NODES", 1))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        return DistEnv(
            rank=_int(env, "SLURM_PROCID", 0), local_rank=_int(env, "SLURM_LOCALID", 0), world_size=world,
            local_world_size=int(per_node) if per_node.isdigit() else max(1, world // max(1, nodes)),
            node_rank=_int(env, "SLURM_NODEID", 0),
            master_addr=env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1"),
            master_port=_port(env), source="slurm",
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        rank = _int(env, "OMPI_COMM_WORLD_RANK", 0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
        return DistEnv(
            rank=rank, local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
            world_size=_int(env, "OMPI_COMM_WORLD_SIZE", 1), local_world_size=local_world,
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", rank // max(1, local_world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_port(env), source="openmpi",
        )
    return DistEnv(master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_port(env))
