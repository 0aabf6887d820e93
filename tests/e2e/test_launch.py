"""Multi-node torchrun end to end on one machine: two "nodes" equal one node, a killed rank ends the job with its
rank named, and ``--max-restarts`` restarts and resumes from the last checkpoint.

    pytest tests/e2e/test_launch.py          # 4 launches, ~1-2 min on 2 cores

Every command comes from ``python -m launch torchrun`` (printed, or exec'd with ``--run``), so these tests
check the commands users get, not hand-written ones.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.torchrun import executable_command
from tests.e2e.launch_helpers import TINY, Launched, free_port, read_steps, train_env, wait_for, worker_pid

pytestmark = [pytest.mark.slow]

# The tiny model for a few steps, ZeRO-2 over 2 data-parallel ranks; no validation, no periodic checkpoints.
STEPS = 6
COMMON = ["--zero.stage=2", f"--train.steps={STEPS}", "--train.eval_every=0", "--checkpoint.every=0",
          "--logging.wandb=false"]


def launch_command(*args: str, overrides: list[str]) -> list[str]:
    """What ``python -m launch torchrun ARGS -- OVERRIDES`` prints, as an argv for this interpreter."""
    out = subprocess.run([sys.executable, "-m", "launch", "torchrun", "--config", TINY, *args, "--", *overrides],
                         capture_output=True, text=True, check=True, env=train_env(), timeout=60)
    return shlex.split(out.stdout.strip())


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step losses of the reference: one node, 2 processes (``--standalone``), exec'd through ``--run``."""
    tmp = tmp_path_factory.mktemp("one_node")
    argv = [sys.executable, "-m", "launch", "torchrun", "--config", TINY, "--nproc-per-node", "2", "--run", "--",
            *COMMON, f"--run.dir={tmp / 'run'}"]
    with Launched.start(argv, log=tmp / "node.log") as proc:
        assert proc.wait(timeout=240) == 0, proc.output()[-3000:]
        assert "--standalone" in proc.output()  # the [launch] line echoes the exec'd command
    steps = read_steps(tmp / "run")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return {r["step"]: r["loss"] for r in steps}


@pytest.mark.timeout(360)
def test_two_nodes_match_one_node(tmp_path: Path, one_node_losses: dict[int, float]) -> None:
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1, 1 process each) = one node with 2."""
    port, run_dir = free_port(), tmp_path / "run"
    overrides = [*COMMON, f"--run.dir={run_dir}"]
    cmds = [launch_command("--nodes", "2", "--node-rank", str(r), "--master", f"127.0.0.1:{port}",
                           "--nproc-per-node", "1", overrides=overrides) for r in (0, 1)]
    for rank, cmd in enumerate(cmds):
        assert cmd[0] == "torchrun" and "--nnodes=2" in cmd and "--nproc-per-node=1" in cmd
        assert "--rdzv-backend=c10d" in cmd and f"--rdzv-endpoint=127.0.0.1:{port}" in cmd
        assert f"--rdzv-conf=is_host={int(rank == 0)}" in cmd
    nodes = [Launched.start(executable_command(cmd), log=tmp_path / f"node{r}.log") for r, cmd in enumerate(cmds)]
    try:
        codes = [node.wait(timeout=300) for node in nodes]
        assert codes == [0, 0], "\n".join(node.output()[-2000:] for node in nodes)
    finally:
        for node in nodes:
            node.stop()
    steps = read_steps(run_dir)
    assert "world 2 (tp 1 pp 1 dp 2)" in nodes[0].output() + nodes[1].output()
    two_node = {r["step"]: r["loss"] for r in steps}
    assert sorted(two_node) == sorted(one_node_losses)
    diffs = {s: abs(two_node[s] - one_node_losses[s]) for s in two_node}
    print(f"two nodes vs one node, max |loss difference| over {STEPS} steps: {max(diffs.values()):.3g}")
    assert max(diffs.values()) <= 1e-6, diffs
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()


def _start_long_run(tmp_path: Path, *extra: str, steps: int, every: int = 0) -> tuple[Launched, Path]:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "launch", "torchrun", "--config", TINY, "--nproc-per-node", "2",
            "--shutdown-timeout", "20", *extra, "--run", "--", "--zero.stage=2", f"--train.steps={steps}",
            "--train.eval_every=0", f"--checkpoint.every={every}", "--train.log_every=1",
            f"--run.dir={run_dir}"]
    return Launched.start(argv, log=tmp_path / "torchrun.log"), run_dir


@pytest.mark.timeout(300)
def test_killed_rank_ends_the_job_and_names_it(tmp_path: Path) -> None:
    """kill -9 of rank 1 mid-run: torchrun stops rank 0 and exits non-zero within 60 s, naming rank 1."""
    proc, run_dir = _start_long_run(tmp_path, steps=100_000)
    with proc:
        wait_for(lambda: len(read_steps(run_dir)) >= 2, timeout_s=180, what="two training steps", alive=proc)
        victim = worker_pid(proc.proc.pid, rank=1)
        assert victim is not None, "no torchrun worker with RANK=1 found"
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = proc.wait(timeout=120)
        seconds = time.monotonic() - killed
        out = proc.output()
    print(f"kill -9 of rank 1 (pid {victim}) -> torchrun exited {code} after {seconds:.1f} s")
    assert code != 0
    assert seconds < 60, f"the job took {seconds:.0f} s to end after rank 1 died"
    # torchrun's summary block lists rank 1 as killed by SIGKILL; it is normally the "Root Cause (first observed
    # failure)", but rank 0's own exit can tie with it within torchrun's one-second timestamps.
    assert "train FAILED" in out, out[-3000:]
    summary = out[out.index("train FAILED"):]
    assert re.search(rf"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9 \(pid: {victim}\)", summary), summary
    assert "Signal 9 (SIGKILL) received by PID" in summary
    assert len(read_steps(run_dir)) < 100_000


@pytest.mark.timeout(420)
def test_max_restarts_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """With --max-restarts 1 the same kill restarts both workers, which resume from the newest checkpoint."""
    steps, every = 40, 5
    proc, run_dir = _start_long_run(tmp_path, "--max-restarts", "1", steps=steps, every=every)
    with proc:
        first = run_dir / "checkpoints" / f"step_{every:08d}" / "COMPLETE"
        wait_for(first.exists, timeout_s=180, what=f"the step-{every} checkpoint", alive=proc)
        victim = worker_pid(proc.proc.pid, rank=1)
        assert victim is not None, "no torchrun worker with RANK=1 found"
        os.kill(victim, signal.SIGKILL)
        code = proc.wait(timeout=300)
        out = proc.output()
    assert code == 0, out[-3000:]
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", out)]
    assert len(resumed) == 1 and resumed[0] >= every and resumed[0] % every == 0, out[-3000:]
    assert out.count("fresh start") == 1
    # the restarted workers continued at the checkpoint: the next step printed after the resume is K + 1
    after = out[out.index("resumed from"):]
    assert re.search(r"step (\d+)/", after).group(1) == str(resumed[0] + 1)
    assert [r["step"] for r in read_steps(run_dir)] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").exists()
