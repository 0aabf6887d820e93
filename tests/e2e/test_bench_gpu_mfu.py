"""``benchmarks/bench_gpu_mfu.py`` works end to end: on CPU at debug size (the measurement itself needs a GPU).

The script drives ``python -m train`` and summarises the loop's own ``metrics.jsonl``; this checks the command
line it builds runs, the medians are taken after the warm-up, and a CPU run never claims the GPU goal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.timeout(300)]


def test_cpu_smoke_run_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "mfu.json"
    cmd = [sys.executable, "benchmarks/bench_gpu_mfu.py", "--model", "debug_tiny", "--seq-len", "64",
           "--micro-batch", "2", "--grad-accum", "2", "--steps", "4", "--warmup", "1", "--dtype", "fp32",
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["measured_steps"] == 3  # 4 steps, the first one is warm-up
    assert result["tokens_per_step"] == 64 * 2 * 2
    assert 0 < result["mfu"] < 1 and result["tokens_per_s"] > 0 and result["peak_flops"] > 1e9
    assert result["device"].startswith("cpu") and result["goal_met"] is False
    assert "--model.name=debug_tiny" in result["command"]
    assert result["document_mask"] is True and "--data.document_mask=true" in result["command"]  # what users run
