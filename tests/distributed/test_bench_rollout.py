"""A small run of ``benchmarks/bench_rollout.py``: under ZeRO-3 (2 processes), gathering the policy's weights once
per rollout samples the same tokens as gathering them per token, and is much faster in the same run.

The full measurement (debug_15m, 8 prompts x 64 tokens per rank, 3 repeats) is recorded in
``benchmarks/RESULTS.md``; this one uses 2 prompts x 16 tokens and asserts a 3x floor (the goal, 5x, is for
the full run: the fixed cost of the one gather weighs more on 16 tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_gathered_rollout_is_faster_and_identical(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_rollout.py", "--model", "debug_15m", "--batch", "2", "--new-tokens",
           "16", "--repeats", "1", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["outputs_identical"] and result["zero_stage"] == 3 and result["data_parallel"] == 2
    assert result["speedup_once_over_per_token"] >= 3.0, result
