"""End-to-end tiny PPO through ``python -m rlhf.ppo`` (real DeepSpeed engines, one process, CPU).

- A seeded debug_tiny policy on synthetic prompts with a programmatic reward (answers made of target tokens):
  the held-out reward rises over the iterations while the KL to the reference stays bounded; the best
  held-out policy, the final policy and the value model are exported; ``python -m train.report`` plots the run.
- NaN handling: a scorer that returns NaN makes every iteration skip its update, and the run aborts after
  ``guards.max_consecutive_nonfinite`` with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TINY = ["--config", "configs/rlhf/ppo_tiny.toml", "--ppo.iterations=10", "--eval.every=5", "--eval.patience=0",
        "--prompts.synthetic_safety_fraction=0"]


def _ppo(args: list[str], *, timeout: int = 360) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "rlhf.ppo", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


class NaNScorer:
    outputs = "probability"

    def __call__(self, prompts: list, answers: list) -> torch.Tensor:
        return torch.full((len(answers),), float("nan"))


def nan_scorer(**_: object) -> NaNScorer:
    return NaNScorer()


def test_tiny_ppo_raises_heldout_reward_with_bounded_kl(tmp_path: Path) -> None:
    run = tmp_path / "ppo"
    proc = _ppo([*TINY, f"--run.dir={run}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    held = {r["step"]: r["heldout/reward/logit_combined"] for r in records if "heldout/reward/logit_combined" in r}
    assert sorted(held) == [0, 5, 10]
    assert held[5] > held[0] and held[10] > held[0] + 0.5, held
    train = [r for r in records if r["step"] > 0]
    assert len(train) == 10 and not any(r["skipped"] for r in train)
    first, last = train[:3], train[-3:]
    assert sum(r["reward/logit_combined"] for r in last) > sum(r["reward/logit_combined"] for r in first)
    # KL bounded: far below the alarm threshold, never alarmed, and the k3 monitor agrees it is small per token.
    assert max(r["kl"] for r in train) < 15.0 and max(r["kl_k3"] for r in train) < 1.5
    assert all(not any("kl_max" in a for a in r["alarms"]) for r in train)
    assert train[-1]["entropy"] < train[0]["entropy"]
    for key in ("reward/helpful", "reward/safety", "reward/combined", "clip_fraction", "value_loss",
                "response_length", "gen_time_s", "train_time_s", "policy_grad_norm"):
        assert all(isinstance(r[key], float) for r in train), key
    for name in ("best_policy", "final_policy"):
        assert (run / name / "model.safetensors").is_file(), name
    assert (run / "final_value" / "reward_model.json").is_file()
    assert "best held-out LOGIT(Rc)" in proc.stdout and "PPO completed after 10 iterations" in proc.stdout
    report = subprocess.run([sys.executable, "-m", "train.report", str(run)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (run / "report" / "ppo.png").stat().st_size > 10_000 and (run / "report" / "all_metrics.png").is_file()


def test_nan_rewards_skip_updates_then_abort(tmp_path: Path) -> None:
    run = tmp_path / "nan"
    proc = _ppo([*TINY, "--reward.helpful=tests.e2e.test_ppo_tiny:nan_scorer", "--guards.max_consecutive_nonfinite=2",
                 "--eval.every=0", f"--run.dir={run}"], timeout=240)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "non-finite rewards / log-probs / values" in proc.stderr and "2 iterations in a row" in proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["skipped"]
    assert not (run / "final_policy").exists()
