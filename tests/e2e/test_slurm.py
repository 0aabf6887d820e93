"""A real SLURM (Debian's slurm-wlm: munged + slurmctld + slurmd on localhost) runs the generated sbatch script.

    pytest tests/e2e/test_slurm.py       # needs root and slurm-wlm (launch/ci/install_slurm.sh); ~1-2 min

One job of the tiny model (2 processes per node, gloo) from ``python -m launch slurm``, interrupted twice:
 1. ``scancel --batch --signal=USR1``: exactly what ``#SBATCH --signal=B:USR1@LEAD`` delivers before the time
    limit. The script's trap forwards it through srun and torchrun to the workers, they checkpoint, and the
    script requeues its own job.
 2. ``scontrol requeue``: an operator/preemption requeue (SIGTERM to the job): the workers checkpoint within
    KillWait and SLURM requeues the job.
Each requeued run must resume from the checkpoint the previous run wrote (never restart), and the last one
must finish: every step once in metrics.jsonl, the final checkpoint complete, exit code 0. A PPO job
(``--module rlhf.ppo``) is requeued by USR1 the same way and finishes.
Skips (with the reason) only where the machine cannot run the daemons: not root, binaries missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT as REPO
from tests.e2e.launch_helpers import TINY, read_steps, train_env, wait_for
from tests.e2e.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slow]

STEPS = 400  # long enough that both interruptions land mid-run even when steps take ~10 ms


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    """A one-node cluster for this module; the daemons are stopped by PID (and the queue drained) at the end."""
    try:
        slurm = SlurmCluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no SLURM cluster on this machine: {err}")
    slurm.env.update({k: v for k, v in train_env().items() if k in ("PATH", "DS_ACCELERATOR", "PYTHONUNBUFFERED")})
    try:
        yield slurm
    finally:
        slurm.stop()


def _segments(node_log: str) -> list[tuple[int, list[int]]]:
    """Per training run in the (appended) node log: (start step, the steps it printed)."""
    runs: list[tuple[int, list[int]]] = []
    for line in node_log.splitlines():
        start = re.match(r"run \S+: .*?(fresh start|resumed from \S+ at step (\d+))", line)
        if start:
            runs.append((int(start.group(2) or 0), []))
        step = re.match(r"step (\d+)/\d+ \|", line)
        if step and runs:
            runs[-1][1].append(int(step.group(1)))
    return runs


def _wait_requeued(cluster: SlurmCluster, job: str, restarts: int, *, timeout_s: float = 240) -> None:
    """Wait until the job runs again after its ``restarts``-th requeue, lifting SLURM's ~2 min requeue hold.

    The hold is lifted only after the job has been pending for a few seconds: slurmd revokes the job's launch
    credential when the old run is killed, with one-second resolution, and refuses ("Job N already killed, do
    not launch batch job") a relaunch whose credential is from the same second, which fails the job."""
    pending_since: list[float] = []

    def running_again() -> bool:
        info = cluster.job_info(job)
        assert info.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), \
            f"job {job} ended instead of being requeued: {info}"
        if int(info.get("Restarts", 0)) < restarts:
            return False
        if info.get("JobState") == "PENDING":
            pending_since[:] = pending_since or [time.monotonic()]
            if time.monotonic() - pending_since[0] >= 3.0:
                cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        return info.get("JobState") == "RUNNING"

    wait_for(running_again, timeout_s=timeout_s, poll_s=0.5, what=f"job {job} running after requeue {restarts}")


@pytest.mark.timeout(900)
def test_generated_script_runs_requeues_and_resumes(cluster: SlurmCluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    run_dir, logs, script = tmp_path / "run", tmp_path / "logs", tmp_path / "tiny.sbatch"
    subprocess.run([sys.executable, "-m", "launch", "slurm", "--config", TINY, "--nodes", "1", "--gpus-per-node",
                    "0", "--nproc-per-node", "2", "--job-name", "tiny", "--time", "00:30:00", "--signal-lead", "120",
                    "--log-root", str(logs), "--output", str(script), "--", "--zero.stage=2",
                    f"--train.steps={STEPS}", "--train.eval_every=0", "--checkpoint.every=0",
                    "--train.log_every=1", f"--run.dir={run_dir}"], check=True, env=train_env(), timeout=60)
    assert "--gpus-per-node" not in script.read_text() and "NCCL" not in script.read_text()
    job = cluster.sbatch(script, cwd=tmp_path)
    node_log = logs / f"tiny-{job}" / "node0.out"

    def progress(at_least: int) -> bool:
        assert cluster.job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"job {job} left the queue early: {cluster.job_info(job)}\n{cluster.logs()}"
        return len(read_steps(run_dir)) >= at_least

    try:
        # 1. the time-limit signal path: USR1 to the batch shell only
        wait_for(lambda: progress(3), timeout_s=300, what="3 steps of the first run")
        cluster.run("scancel", "--batch", "--signal=USR1", job)
        _wait_requeued(cluster, job, 1)
        first = _segments(node_log.read_text())[0][1][-1]
        # 2. an operator requeue while the second run trains
        wait_for(lambda: progress(first + 3), timeout_s=300, what="3 steps of the resumed run")
        cluster.run("scontrol", "requeue", job)
        _wait_requeued(cluster, job, 2)
        info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                                  timeout_s=400)
    except BaseException:
        print(cluster.logs(), (logs / f"tiny-{job}.out").read_text() if (logs / f"tiny-{job}.out").exists() else "")
        raise
    batch_log = (logs / f"tiny-{job}.out").read_text()
    text = node_log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, batch_log, text[-3000:])
    assert int(info["Restarts"]) == 2
    assert "SIGUSR1: time limit in 120s; checkpointing, then requeue" in batch_log
    assert f"requeueing {job}" in batch_log and batch_log.count(f"job {job} restart") == 3

    runs = _segments(text)
    assert len(runs) == 3, runs
    assert runs[0][0] == 0 and runs[0][1][0] == 1  # fresh start
    for (_, printed), (next_start, next_printed) in zip(runs, runs[1:]):
        assert next_start == printed[-1], "a requeued run must resume from the step the previous run reached"
        assert next_printed[0] == next_start + 1, "resumed runs continue at the next step, not from step 1"
    assert 0 < runs[1][0] < runs[2][0] < STEPS and runs[2][1][-1] == STEPS
    assert re.search(rf"pre-empted \(SIGUSR1\) at step {runs[1][0]}:", text)
    assert re.search(rf"pre-empted \(SIGTERM\) at step {runs[2][0]}:", text)
    assert [r["step"] for r in read_steps(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()
    print(f"job {job}: run 1 steps 1-{runs[1][0]} (USR1), run 2 {runs[1][0] + 1}-{runs[2][0]} (requeue), "
          f"run 3 {runs[2][0] + 1}-{STEPS}")


PPO_ITERATIONS = 30


def _ppo_iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut mid-write
    return steps


@pytest.mark.timeout(900)
def test_ppo_job_requeues_on_usr1_and_finishes(cluster: SlurmCluster, tmp_path: Path) -> None:
    """A PPO job (``--module rlhf.ppo``, 2 processes, ZeRO-3): the time-limit USR1 makes it checkpoint at the
    next iteration boundary and requeue itself; the requeued run resumes there and finishes."""
    tmp_path.chmod(0o755)
    run_dir, logs, script = tmp_path / "ppo", tmp_path / "logs", tmp_path / "ppo.sbatch"
    subprocess.run([sys.executable, "-m", "launch", "slurm", "--module", "rlhf.ppo", "--config",
                    str(REPO / "configs" / "rlhf" / "ppo_tiny.toml"), "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
                    "--job-name", "ppo", "--time", "00:30:00", "--signal-lead", "120", "--log-root", str(logs),
                    "--output", str(script), "--", f"--ppo.iterations={PPO_ITERATIONS}", "--eval.every=10",
                    "--eval.patience=0", "--checkpoint.every=5", "--zero.stage=3", f"--run.dir={run_dir}"],
                   check=True, env=train_env(), timeout=60, cwd=REPO)
    assert "-m rlhf.ppo --config " in script.read_text()
    job = cluster.sbatch(script, cwd=REPO)
    node_log = logs / f"ppo-{job}" / "node0.out"
    try:
        wait_for(lambda: len(_ppo_iterations(run_dir)) >= 3, timeout_s=300, what="3 PPO iterations")
        cluster.run("scancel", "--batch", "--signal=USR1", job)
        _wait_requeued(cluster, job, 1)
        info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                                  timeout_s=500)
    except BaseException:
        print(cluster.logs(), (logs / f"ppo-{job}.out").read_text() if (logs / f"ppo-{job}.out").exists() else "")
        raise
    text, batch_log = node_log.read_text(), (logs / f"ppo-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, batch_log, text[-3000:])
    assert int(info["Restarts"]) == 1 and f"requeueing {job}" in batch_log
    stopped = re.search(r"pre-empted \(SIGUSR1\) at iteration (\d+)", text)
    assert stopped and 0 < int(stopped.group(1)) < PPO_ITERATIONS, text[-3000:]
    assert re.search(rf"resumed from \S+step_{int(stopped.group(1)):08d} at iteration {stopped.group(1)}", text)
    assert _ppo_iterations(run_dir) == list(range(PPO_ITERATIONS + 1))  # every iteration once (0: first eval)
    assert (run_dir / "final_policy" / "model.safetensors").is_file()
