"""PPO survives kill -9 and pre-emption (``python -m rlhf.ppo``, real DeepSpeed engines, fp32 on CPU).

- One uninterrupted run; one run of the same config killed with SIGKILL five times at random moments (each
  after it has made progress: mid-iteration, mid-evaluation, mid-checkpoint write, mid-export) and continued
  with ``--resume auto``, then pre-empted with SIGTERM (exit 143 with a checkpoint: what SLURM sends before
  its kill), continued, pre-empted with SIGUSR1 (exit 0 with a checkpoint) and continued to the end:
  its final policy and value weights (and best held-out policy) equal the uninterrupted run's bit for bit,
  and every logged metric (held-out reward curve included) is the same at every iteration.
- Resume at another data-parallel size: the uninterrupted run's checkpoint of iteration 8, continued by two
  processes under ZeRO-3, ends within 1e-5 of the uninterrupted one (the DP2 parity tolerance).
- Resume at another tensor-parallel size: the same checkpoint (written at TP1) continued by two processes at
  TP2 gives the same next losses and final weights within the TP2 parity tolerance.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ITERATIONS = 12
ARGS = ["--config", "configs/rlhf/ppo_tiny.toml", f"--ppo.iterations={ITERATIONS}", "--eval.every=2",
        "--eval.patience=0", "--checkpoint.every=1", f"--checkpoint.keep_last={ITERATIONS}", "--train.dtype=fp32"]
TIMING = ("gen_time_s", "score_time_s", "train_time_s", "rollout_tokens_per_s", "elapsed_s")
EXPORTS = {"final_policy": "model.safetensors", "final_value": "reward_model.safetensors",
           "best_policy": "model.safetensors"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "rlhf.ppo", *ARGS, f"--run.dir={run_dir}", *extra],
                            cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _records(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    out = {}
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        out[rec["step"]] = {k: v for k, v in rec.items() if k not in TIMING}
    return out


def _wait_for_progress(proc: subprocess.Popen, run_dir: Path, *, after: int, timeout_s: float = 240) -> bool:
    """Until the run has logged an iteration beyond ``after`` (True) or exited (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if max(_records(run_dir), default=-1) > after:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no progress in {timeout_s} s; see {run_dir}.log")


def _log(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ppo_resume") / "uninterrupted"
    run.parent.mkdir(exist_ok=True)
    assert _start(run).wait(timeout=400) == 0, _log(run)
    return run


def test_kill9_five_times_sigterm_and_sigusr1_then_resume_is_bit_identical(uninterrupted: Path, tmp_path: Path) -> None:
    run, rng = tmp_path / "killed", random.Random(20261205)
    kills = 0
    while kills < 5:
        proc = _start(run, "--resume", "auto")
        seen = max(_records(run), default=-1)
        assert _wait_for_progress(proc, run, after=seen), f"the run ended before kill {kills + 1}:\n{_log(run)}"
        time.sleep(rng.uniform(0.0, 0.6))  # a random moment after progress: any phase, checkpoint writes too
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = _start(run, "--resume", "auto")
    assert _wait_for_progress(proc, run, after=max(_records(run), default=-1))
    proc.send_signal(signal.SIGTERM)  # what SLURM sends before the kill at pre-emption
    assert proc.wait(timeout=240) == 143, _log(run)  # SIGTERM: checkpoint, exit 143 (like python -m train)
    assert "pre-empted (SIGTERM)" in _log(run) and not (run / "final_policy").exists(), _log(run)
    terminated_at = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert terminated_at < ITERATIONS, "SIGTERM arrived after the last iteration: not a pre-emption"
    assert max(_records(run)) == terminated_at  # the checkpoint is the last logged iteration: nothing lost
    proc = _start(run, "--resume", "auto")
    assert _wait_for_progress(proc, run, after=max(_records(run), default=-1))
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=240) == 0, _log(run)  # SIGUSR1: checkpoint, exit 0 (SLURM requeues)
    log = _log(run)
    assert "pre-empted (SIGUSR1)" in log and not (run / "final_policy").exists(), log
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert stopped_at < ITERATIONS, "SIGUSR1 arrived after the last iteration: not a pre-emption"
    assert _start(run, "--resume", "auto").wait(timeout=400) == 0, _log(run)
    text = (run.parent / "killed.log").read_text()
    resumed_at = [line for line in text.splitlines() if "resumed from" in line]
    assert len(resumed_at) >= 2, f"the kills never resumed from a checkpoint:\n{text[-3000:]}"
    ours, theirs = _records(run), _records(uninterrupted)
    assert sorted(ours) == sorted(theirs) == list(range(ITERATIONS + 1))
    for step in theirs:
        assert ours[step] == theirs[step], f"iteration {step} differs after the kills"
    heldout = [theirs[s]["heldout/reward/logit_combined"] for s in sorted(theirs) if "heldout/reward/combined"
               in theirs[s]]
    assert len(heldout) == ITERATIONS // 2 + 1 and len(set(heldout)) > 1
    for name, file in EXPORTS.items():
        a, b = load_file(str(run / name / file)), load_file(str(uninterrupted / name / file))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].equal(b[key]), f"{name}/{key} differs"


@pytest.mark.parametrize("layout", ["dp2_zero3", "tp2"])
def test_resume_at_another_layout(layout: str, uninterrupted: Path, tmp_path: Path) -> None:
    """A TP1 x DP1 checkpoint continued at DP2 x ZeRO-3 or at TP2 (the saved shards are read slice-wise)."""
    run = tmp_path / layout
    resume_from = uninterrupted / "checkpoints" / f"step_{ITERATIONS - 2:08d}"
    flags = {"dp2_zero3": ["--zero.stage=3"], "tp2": ["--parallel.tp=2"]}[layout]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "rlhf.ppo",
           *ARGS, f"--run.dir={run}", f"--run.resume={resume_from}", *flags]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {resume_from} at iteration {ITERATIONS - 2}" in proc.stdout
    ours, theirs = _records(run), _records(uninterrupted)
    assert sorted(ours) == [ITERATIONS - 1, ITERATIONS]
    for step in ours:
        for key, value in theirs[step].items():
            if isinstance(value, float):
                assert ours[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
    for name in ("final_policy", "final_value"):
        a, b = load_file(str(run / name / EXPORTS[name])), load_file(str(uninterrupted / name / EXPORTS[name]))
        for key in b:
            assert (a[key] - b[key]).abs().max() <= 1e-5, f"{name}/{key}"
