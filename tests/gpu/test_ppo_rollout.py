"""A PPO rollout on the GPU from the ZeRO-3 gathered copy of the policy (the 70B preset's rollout path).

One process on the GPU runs ``tests/distributed/run_ppo_layouts.py`` (the PPO parity worker: two iterations of
rollout, scoring, GAE and updates) three times: ZeRO-3 with the policy gathered once per rollout, ZeRO-3
gathering per token (the slow path, as the reference), both fp32; and the gathered copy in bf16 with activation
checkpointing. The two fp32 rollouts must sample the same answers and agree on every log-prob, value and
advantage within 1e-5 (the same weights reached two ways); the bf16 one must finish with finite metrics and
sample mostly the same answers (at least 12 of 16: sampling reads bf16 logits).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(420)]
RUNNER = REPO_ROOT / "tests" / "distributed" / "run_ppo_layouts.py"
ZERO3 = "--parallel.zero_stage=3"


def _flat(x: float | list[float]) -> list[float]:
    return x if isinstance(x, list) else [x]


def test_rollout_from_the_zero3_gathered_copy(cuda: torch.device, tmp_path: Path) -> None:
    layouts = {"once": [ZERO3, "--rollout.gather=once"], "per_token": [ZERO3, "--rollout.gather=per_token"],
               "once_bf16": [ZERO3, "--rollout.gather=once", "--parallel.dtype=bf16",
                             "--parallel.activation_checkpoint_every=1"]}
    specs = [f"{name}={','.join(args)}" for name, args in layouts.items()]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(RUNNER), str(tmp_path), *specs], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    result = {name: json.loads((tmp_path / name / "result.json").read_text()) for name in layouts}
    once, per_token, bf16 = result["once"], result["per_token"], result["once_bf16"]
    assert once["prompts"].keys() == per_token["prompts"].keys() and len(once["prompts"]) == 16
    for index, ref in per_token["prompts"].items():
        mine = once["prompts"][index]
        assert mine["answer"] == ref["answer"], index
        for field in ("score", "old_logp", "ref_logp", "values", "advantages"):
            gap = max(abs(a - b) for a, b in zip(_flat(mine[field]), _flat(ref[field]), strict=True))
            assert gap <= 1e-5, (index, field, gap)
    same = sum(bf16["prompts"][i]["answer"] == r["answer"] for i, r in once["prompts"].items())
    assert same >= 12, same
    for record in bf16["metrics"]:
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float)), record
