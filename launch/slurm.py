"""Writes (and optionally submits) the sbatch script for a multi-node training run.

    python -m launch slurm --config configs/pretrain_8b.toml --nodes 16 --gpus-per-node 8 \
        --partition gpu --time 2-00:00:00 --account proj [--submit]
    python -m launch slurm --config c.toml --nodes 1 --gpus-per-node 0 --nproc-per-node 2   # CPU-only SLURM

The script runs one ``srun`` task per node; each runs ``torchrun`` with the c10d rendezvous on the first node
of the allocation (``scontrol show hostnames $SLURM_JOB_NODELIST | head -n1``) keyed by the job id, so a
requeued job (same id) rendezvouses again cleanly. Training is always started with ``--resume auto``: it
resumes from the newest checkpoint of the run when there is one, else starts fresh, so the first run and
every requeued run use the same command.

The exact path of the "time is nearly up" signal (``#SBATCH --signal=B:USR1@LEAD``):
 1. LEAD seconds before the time limit slurmctld sends SIGUSR1 to the batch shell only (``B:``); srun steps
    and torchrun do not receive it directly.
 2. The shell's ``trap`` sets REQUEUE=1 and ``kill -USR1``s the background ``srun``; srun forwards signals
    it receives to the tasks of its step (srun(1), "SIGNALS"): the torchrun agent on every node.
 3. torchrun (started with ``--signals-to-handle=...,SIGUSR1``) raises ``SignalException`` in its agent and
    forwards SIGUSR1 to every worker's process group, then waits ``--shutdown-timeout`` (LEAD - 60 s) before
    SIGKILL. The workers checkpoint on SIGUSR1 and exit.
 4. When srun returns, the shell runs ``scontrol requeue $SLURM_JOB_ID`` (``#SBATCH --requeue``); the job
    goes back to the queue with the same id, appends to the same logs (``--open-mode=append``) and the
    next run resumes with ``--resume auto``.
Without ``B:`` SLURM would signal the steps (torchrun) directly and step 3 would still happen, but the batch
shell would not know it must requeue; the trap keeps the decision in one place.

NCCL/torch environment (why each):
 * TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (and the legacy NCCL_ASYNC_ERROR_HANDLING=1): a timed-out or failed
   collective aborts the communicator and kills the process, so torchrun and srun exit instead of hanging
   until the time limit (the "multi-node hang with no message" pain).
 * TORCH_NCCL_BLOCKING_WAIT is left unset (0): blocking wait makes every ``wait()`` spin on the CPU and
   serialises communication with compute; async error handling gives the same hang protection for free.
 * TORCH_NCCL_DUMP_ON_TIMEOUT=1 + TORCH_FR_BUFFER_SIZE (the current name; TORCH_NCCL_TRACE_BUFFER_SIZE only
   warns in torch 2.13): the flight recorder dumps which collective each rank was in when a timeout fires
   (files under the job's log folder), so a hang leaves a trace.
 * OMP_NUM_THREADS = cpus-per-task / processes per node (at least 1), computed at run time.
 * CUDA_DEVICE_MAX_CONNECTIONS=1 (GPU jobs): Megatron needs it to order TP communication before compute.
CPU jobs (``--gpus-per-node 0 --nproc-per-node P``) export none of the NCCL/CUDA variables: training picks gloo
itself when CUDA is absent (``train/topology.py``), and a hung gloo collective fails after
``--train.collective_timeout_s``. Checked end to end on a real one-node Slurm 22.05 (tests/e2e/test_slurm.py).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launch.torchrun import build_torchrun_args


@dataclass
class SlurmJob:
    config: str
    nodes: int = 1
    gpus_per_node: int = 8
    """0 means a CPU-only job: no ``--gpus-per-node`` line; ``nproc_per_node`` processes per node."""
    nproc_per_node: int | None = None
    job_name: str = "llama"
    partition: str | None = None
    time: str = "24:00:00"
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    exclusive: bool = False
    signal_lead_s: int = 300
    """Seconds before the time limit at which training is told to checkpoint."""
    log_root: str = "logs"
    overrides: list[str] = field(default_factory=list)
    resume: str | None = "auto"
    extra_sbatch: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    module: str = "train"
    """The program torchrun starts (``-m MODULE --config CONFIG``): ``train`` or a stage, e.g. ``rlhf.ppo``."""

    @property
    def procs_per_node(self) -> int:
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def validate(self) -> SlurmJob:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.procs_per_node < 1:
            raise ValueError("--nodes must be >= 1, --gpus-per-node >= 0 and --nproc-per-node >= 1")
        limit = time_to_seconds(self.time)
        if not 60 <= self.signal_lead_s < limit:
            raise ValueError(f"--signal-lead {self.signal_lead_s}s must be >= 60 and below --time {self.time} "
                             f"({limit}s); it is how long training has to checkpoint")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", self.module):
            raise ValueError(f"--module {self.module!r}: a Python module name such as train or rlhf.ppo")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.job_name):
            raise ValueError(f"--job-name {self.job_name!r}: use letters, digits, '.', '_' or '-'")
        return self


def time_to_seconds(value: str) -> int:
    """SLURM time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    days, _, rest = value.rpartition("-") if "-" in value else ("0", "", value)
    parts = rest.split(":")
    if not days.isdigit() or not all(p.isdigit() for p in parts) or len(parts) > 3:
        raise ValueError(f"--time {value!r} is not a SLURM time (e.g. 24:00:00 or 2-00:00:00)")
    nums = [int(p) for p in parts]
    if "-" in value:  # D-HH[:MM[:SS]]
        nums += [0] * (3 - len(nums))
        h, m, s = nums
    elif len(nums) == 1:
        h, m, s = 0, nums[0], 0
    elif len(nums) == 2:
        h, m, s = 0, nums[0], nums[1]
    else:
        h, m, s = nums
    return int(days) * 86400 + h * 3600 + m * 60 + s


_TEMPLATE = re.compile(r"\$(SLURM_|MASTER_|NPROC_PER_NODE)")


def _sh(arg: str) -> str:
    """Quote one word: our own ``$VAR`` templates in double quotes (expanded), user values single-quoted."""
    return f'"{arg}"' if _TEMPLATE.search(arg) else shlex.quote(arg)


def _sbatch_lines(job: SlurmJob) -> list[str]:
    lines = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        lines.append(f"--cpus-per-task={job.cpus_per_task}")
    for flag, value in (("partition", job.partition), ("account", job.account), ("qos", job.qos),
                        ("mem", job.mem)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += [f"--time={job.time}", f"--output={job.log_root}/%x-%j.out", "--open-mode=append", "--requeue",
              f"--signal=B:USR1@{job.signal_lead_s}"]
    if job.exclusive:
        lines.append("--exclusive")
    return lines + list(job.extra_sbatch)


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch script text (see the module docstring for the signal path and the environment)."""
    job.validate()
    torchrun = build_torchrun_args(
        nnodes="$SLURM_NNODES", nproc_per_node="$NPROC_PER_NODE", config=job.config, rdzv="c10d",
        master_addr="$MASTER_ADDR", master_port="$MASTER_PORT", rdzv_id="$SLURM_JOB_ID",
        overrides=job.overrides, resume=job.resume, shutdown_timeout=max(30, job.signal_lead_s - 60),
        module=job.module)
    env = {"PYTHONUNBUFFERED": "1"}
    if job.gpus_per_node > 0:  # CPU jobs run gloo (train/topology.py picks it without CUDA): no NCCL/CUDA env
        env.update({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_ASYNC_ERROR_HANDLING": "1",
                    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_BUFFER_SIZE": "2000", "NCCL_DEBUG": "WARN",
                    "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    env.update(job.env)
    srun = ["srun", "--kill-on-bad-exit=1", "--nodes=$SLURM_NNODES", "--ntasks-per-node=1",
            "--output=$LOG_DIR/node%n.out", "--open-mode=append"]
    srun_line = " ".join(_sh(a) if a != "--output=$LOG_DIR/node%n.out" else f'"{a}"' for a in srun)
    body = " \\\n    ".join([srun_line, " ".join(_sh(a) for a in torchrun)])
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    header = "\n".join(f"#SBATCH {line}" for line in _sbatch_lines(job))
    return f"""#!/bin/bash
# Generated by `python -m launch slurm`; regenerate instead of editing. Signal path: launch/slurm.py docstring.
{header}

set -uo pipefail
LOG_DIR="{job.log_root}/${{SLURM_JOB_NAME}}-${{SLURM_JOB_ID}}"
mkdir -p "$LOG_DIR"
export TORCH_FR_DUMP_TEMP_FILE="$LOG_DIR/nccl_trace_rank_"
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export NPROC_PER_NODE={job.procs_per_node}
CPUS="${{SLURM_CPUS_PER_TASK:-$(nproc)}}"
export OMP_NUM_THREADS=$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))
{exports}
echo "[launch] $(date -Is) job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} nodes $SLURM_JOB_NODELIST" \\
     "rendezvous $MASTER_ADDR:$MASTER_PORT logs $LOG_DIR"

REQUEUE=0
SRUN_PID=""
on_usr1() {{
    echo "[launch] $(date -Is) SIGUSR1: time limit in {job.signal_lead_s}s; checkpointing, then requeue"
    REQUEUE=1
    [[ -n "$SRUN_PID" ]] && kill -USR1 "$SRUN_PID"  # srun forwards it to torchrun, torchrun to the workers
}}
on_term() {{
    echo "[launch] $(date -Is) SIGTERM: forwarding to the training step"
    [[ -n "$SRUN_PID" ]] && kill -TERM "$SRUN_PID"
}}
trap on_usr1 USR1
trap on_term TERM

{body} &
SRUN_PID=$!
RC=0
wait "$SRUN_PID" || RC=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do  # a trapped signal interrupted wait; srun is still running
    RC=0
    wait "$SRUN_PID" || RC=$?
done
if [[ "$REQUEUE" == 1 ]]; then
    echo "[launch] $(date -Is) training exited with $RC; requeueing $SLURM_JOB_ID (next run: --resume auto)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[launch] $(date -Is) training exited with $RC"
exit "$RC"
"""


def write_sbatch(job: SlurmJob, path: str | Path | None = None) -> Path:
    """Write the script (default ``<log_root>/<job_name>.sbatch``) and create the log root SLURM writes to."""
    text = render_sbatch(job)
    target = Path(path) if path else Path(job.log_root) / f"{job.job_name}.sbatch"
    target.parent.mkdir(parents=True, exist_ok=True)
    Path(job.log_root).mkdir(parents=True, exist_ok=True)  # SLURM does not create --output directories
    target.write_text(text)
    target.chmod(0o755)
    return target


def submit(path: str | Path, *, sbatch: Sequence[str] = ("sbatch", "--parsable")) -> str:
    """Submit with sbatch and return the job id; a RuntimeError carries sbatch's own message."""
    result = subprocess.run([*sbatch, str(path)], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"sbatch {path} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
