"""The per-node ``torchrun`` command that starts training, printed or executed.

    python -m launch torchrun --config configs/x.toml --nodes 2 --node-rank 0 --master 10.0.0.1:29500
    python -m launch torchrun --config configs/x.toml --run        # node rank / nodes / master from SLURM or MPI

With an explicit node rank the command uses torchrun's static rendezvous (``--node-rank``, ``--master-addr``):
ranks are laid out deterministically, node 0 hosts the TCPStore. The SLURM script instead uses the c10d
rendezvous keyed by the job id (``build_torchrun_args(..., rdzv="c10d")``), which needs no node rank.

Signals: torchrun handles ``--signals-to-handle`` (default SIGTERM,SIGINT,SIGHUP,SIGQUIT; we add SIGUSR1).
On one of them the agent raises ``SignalException``, sends the *same* signal to every worker (``os.killpg``
on each worker's own session, see torch/distributed/elastic/multiprocessing), waits ``--shutdown-timeout``
seconds and then SIGKILLs. So the workers see SIGUSR1 and checkpoint; the timeout must cover a checkpoint.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from launch.env import read_dist_env

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def train_args(*, config: str, overrides: Sequence[str] = (), resume: str | None = "auto",
               module: str = "train") -> list[str]:
    """``-m train --config CONFIG [--section.key=value ...] [--resume auto]``."""
    args = ["-m", module, "--config", config]
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        args.append(item)
    if resume:
        args += ["--resume", resume]
    return args


def build_torchrun_args(*, nnodes: int | str, nproc_per_node: int | str, config: str,
                        rdzv: str = "static", node_rank: int | str | None = None,
                        master_addr: str = "127.0.0.1", master_port: int | str = 29500,
                        rdzv_id: str = "llama", overrides: Sequence[str] = (), resume: str | None = "auto",
                        shutdown_timeout: int = 30, module: str = "train") -> list[str]:
    """The full ``torchrun ...`` argv. Values may be shell expressions (strings) when templated into a script."""
    if rdzv not in ("static", "c10d"):
        raise ValueError(f"rdzv={rdzv!r}: use 'static' (explicit node rank) or 'c10d' (rendezvous by job id)")
    cmd = ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}"]
    if rdzv == "static":
        if node_rank is None:
            raise ValueError("static rendezvous needs node_rank (pass --node-rank or run under SLURM/MPI)")
        cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port}", f"--rdzv-id={rdzv_id}"]
    cmd += [f"--signals-to-handle={HANDLED_SIGNALS}", f"--shutdown-timeout={shutdown_timeout}",
            "--max-restarts=0"]
    return cmd + train_args(config=config, overrides=overrides, resume=resume, module=module)


def parse_master(master: str) -> tuple[str, int]:
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--master {master!r} must be HOST:PORT, e.g. 10.0.0.1:29500")
    return host, int(port)


def node_command(*, config: str, nproc_per_node: int, nodes: int | None = None, node_rank: int | None = None,
                 master: str | None = None, overrides: Sequence[str] = (), resume: str | None = "auto",
                 shutdown_timeout: int = 30, environ: Mapping[str, str] | None = None) -> list[str]:
    """This node's command; missing nodes / node rank / master are read from SLURM or OpenMPI variables
    (one launcher task per node: SLURM_NODEID / SLURM_NNODES, or the MPI rank / size)."""
    env = read_dist_env(environ)
    if env.source == "slurm":
        nodes = nodes if nodes is not None else env.num_nodes
        node_rank = node_rank if node_rank is not None else env.node_rank
    elif env.source == "openmpi":  # mpirun -npernode 1: one launcher per node
        nodes = nodes if nodes is not None else env.world_size // env.local_world_size
        node_rank = node_rank if node_rank is not None else env.rank // env.local_world_size
    nodes = 1 if nodes is None else nodes
    node_rank = 0 if node_rank is None and nodes == 1 else node_rank
    if node_rank is None:
        raise ValueError("--node-rank is required with --nodes > 1 outside SLURM/OpenMPI")
    if not 0 <= node_rank < nodes:
        raise ValueError(f"--node-rank {node_rank} must be in [0, {nodes})")
    addr, port = parse_master(master) if master else (env.master_addr, env.master_port)
    return build_torchrun_args(nnodes=nodes, nproc_per_node=nproc_per_node, config=config, node_rank=node_rank,
                               master_addr=addr, master_port=port, overrides=overrides, resume=resume,
                               shutdown_timeout=shutdown_timeout)


def format_command(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)
