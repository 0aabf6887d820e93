"""The per-node ``torchrun`` command that starts training, printed or executed.

    python -m launch torchrun --config configs/x.toml --nodes 2 --node-rank 0 --master 10.0.0.1:29500
    python -m launch torchrun --config configs/x.toml --nodes 2 --node-rank 1 --master 10.0.0.1:29500 --run
    python -m launch torchrun --config configs/x.toml --nproc-per-node 8 --run   # one node: --standalone
    python -m launch torchrun --config configs/x.toml --run    # node rank / nodes / master from SLURM or MPI

Rendezvous. By default every node joins torchrun's c10d rendezvous at ``--master`` (``--rdzv-backend=c10d
--rdzv-endpoint=HOST:PORT --rdzv-id=ID``): the node given rank 0 hosts the rendezvous store
(``--rdzv-conf=is_host=1``; the others ``is_host=0``), so which machine serves it never depends on hostname
matching. torchrun itself ignores ``--node-rank`` under c10d and numbers the nodes by sorted (host, pid), so it
is only used for ``is_host``; global ranks are still contiguous per node, and ``train/topology.py`` lays them
out as Llama 3 did, [TP, CP, PP, DP] innermost first (``grid_coordinates``): a node of 8 GPUs holds whole TP
groups (TP <= 8) and, with TP x CP <= 8, whole CP groups; stages come next and DP replicas outermost. ``--rdzv static`` gives torchrun's
static rendezvous instead (``--node-rank``, ``--master-addr``, ``--master-port``): fixed node order, no
elasticity. A single node without ``--master`` runs ``--standalone`` (a private store on a free port).

Failures: ``--max-restarts 0`` (default) ends the whole job when any worker dies; torchrun stops the others
(SIGTERM, SIGKILL after ``--shutdown-timeout``) and prints a "Root Cause (first observed failure)" block with
the global rank, exit code and signal. With ``--max-restarts N`` the agents restart all workers up to N times,
and ``--resume auto`` makes them continue from the newest complete checkpoint. Restarts need
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (``command_env``; printed in front of the command and set by ``--run``):
torchrun's default shared rendezvous store keeps the previous attempt's process-group keys, so a restarted
rank can read a dead peer's address and fail with "Connection refused" in gloo/NCCL init (pytorch/pytorch
#135712; reproduced here with torch 2.13 and gloo). One store per attempt avoids it.

Signals: torchrun handles ``--signals-to-handle`` (default SIGTERM,SIGINT,SIGHUP,SIGQUIT; we add SIGUSR1).
On one of them the agent raises ``SignalException``, sends the *same* signal to every worker (``os.killpg``
on each worker's own session, see torch/distributed/elastic/multiprocessing), waits ``--shutdown-timeout``
seconds and then SIGKILLs. So the workers see SIGUSR1 and checkpoint; the timeout must cover a checkpoint.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from launch.env import read_dist_env

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
RENDEZVOUS = ("c10d", "static", "standalone")


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
                        rdzv_id: str = "llama", is_host: bool | None = None, overrides: Sequence[str] = (),
                        resume: str | None = "auto", shutdown_timeout: int = 30, max_restarts: int = 0,
                        module: str = "train") -> list[str]:
    """The full ``torchrun ...`` argv. Values may be shell expressions (strings) when templated into a script.

    ``rdzv``: "static" (explicit node rank), "c10d" (rendezvous store at master_addr:master_port keyed by
    ``rdzv_id``; ``is_host`` pins whether this node serves it) or "standalone" (one node, private store)."""
    if rdzv not in RENDEZVOUS:
        raise ValueError(f"rdzv={rdzv!r}: use 'c10d' (rendezvous store on node 0), 'static' (explicit node "
                         "rank) or 'standalone' (one node)")
    if max_restarts < 0:
        raise ValueError(f"--max-restarts {max_restarts} must be >= 0")
    cmd = ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}"]
    if rdzv == "static":
        if node_rank is None:
            raise ValueError("static rendezvous needs node_rank (pass --node-rank or run under SLURM/MPI)")
        cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    elif rdzv == "c10d":
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port}", f"--rdzv-id={rdzv_id}"]
        if is_host is not None:
            cmd.append(f"--rdzv-conf=is_host={int(is_host)}")
    else:
        cmd.append("--standalone")
    cmd += [f"--signals-to-handle={HANDLED_SIGNALS}", f"--shutdown-timeout={shutdown_timeout}",
            f"--max-restarts={max_restarts}"]
    return cmd + train_args(config=config, overrides=overrides, resume=resume, module=module)


def parse_master(master: str) -> tuple[str, int]:
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--master {master!r} must be HOST:PORT, e.g. 10.0.0.1:29500")
    return host, int(port)


def node_command(*, config: str, nproc_per_node: int, nodes: int | None = None, node_rank: int | None = None,
                 master: str | None = None, overrides: Sequence[str] = (), resume: str | None = "auto",
                 shutdown_timeout: int = 30, rdzv: str = "c10d", rdzv_id: str | None = None,
                 max_restarts: int = 0, environ: Mapping[str, str] | None = None) -> list[str]:
    """This node's command; missing nodes / node rank / master are read from SLURM or OpenMPI variables
    (one launcher task per node: SLURM_NODEID / SLURM_NNODES, or the MPI rank / size).

    The rendezvous id defaults to ``SLURM_JOB_ID`` under SLURM, else "llama": every node must pass the same."""
    env = read_dist_env(environ)
    if env.source == "slurm":
        nodes = nodes if nodes is not None else env.num_nodes
        node_rank = node_rank if node_rank is not None else env.node_rank
    elif env.source == "openmpi":  # mpirun -npernode 1: one launcher per node
        nodes = nodes if nodes is not None else env.world_size // env.local_world_size
        node_rank = node_rank if node_rank is not None else env.rank // env.local_world_size
    nodes = 1 if nodes is None else nodes
    if nodes < 1 or nproc_per_node < 1:
        raise ValueError(f"--nodes {nodes} and --nproc-per-node {nproc_per_node} must be >= 1")
    node_rank = 0 if node_rank is None and nodes == 1 else node_rank
    if node_rank is None:
        raise ValueError("--node-rank is required with --nodes > 1 outside SLURM/OpenMPI")
    if not 0 <= node_rank < nodes:
        raise ValueError(f"--node-rank {node_rank} must be in [0, {nodes}) for --nodes {nodes}")
    if nodes == 1 and master is None and env.source == "single" and rdzv == "c10d":
        rdzv = "standalone"  # nothing to meet: a private store on a free port
    addr, port = parse_master(master) if master else (env.master_addr, env.master_port)
    if rdzv_id is None:
        rdzv_id = (os.environ if environ is None else environ).get("SLURM_JOB_ID") or "llama"
    return build_torchrun_args(nnodes=nodes, nproc_per_node=nproc_per_node, config=config, rdzv=rdzv,
                               node_rank=node_rank, master_addr=addr, master_port=port, rdzv_id=rdzv_id,
                               is_host=node_rank == 0 if rdzv == "c10d" else None, overrides=overrides,
                               resume=resume, shutdown_timeout=shutdown_timeout, max_restarts=max_restarts)


def executable_command(cmd: Sequence[str]) -> list[str]:
    """``cmd`` with ``torchrun`` replaced by this interpreter's ``-m torch.distributed.run`` (same program,
    no dependence on which ``torchrun`` is first on PATH)."""
    if cmd and cmd[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    return list(cmd)


def command_env(*, max_restarts: int) -> dict[str, str]:
    """Environment variables the command needs (see "Restarts" in the module docstring)."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts > 0 else {}


def format_command(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The shell line: ``VAR=value ... torchrun ...``."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*prefix, shlex.join(cmd)])
