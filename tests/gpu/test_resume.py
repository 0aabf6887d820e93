"""Checkpoint save and resume on the GPU through ``python -m train`` (DeepSpeed engine, one process).

An uninterrupted 6-step run checkpoints at step 3; a second run resumes from that checkpoint, on the GPU again,
and must log the same losses and grad norms at steps 4-6. fp32 with TF32 off and deterministic cuBLAS
(``CUBLAS_WORKSPACE_CONFIG``), so the only freedom left is the order of atomic adds in attention backward
kernels: tolerance 1e-6 relative.
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

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

RUN = ["--config", "configs/pretrain/tiny_cpu.toml", "--train.steps=6", "--checkpoint.every=3",
       "--checkpoint.keep_last=2", "--train.eval_every=0", "--train.log_every=1", "--train.dtype=fp32"]


def _train(run_dir: Path, *extra: str) -> tuple[dict[int, dict], str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    done = subprocess.run([sys.executable, "-m", "train", *RUN, f"--run.dir={run_dir}", *extra], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r.get("type") == "train"}, done.stdout


def test_resume_on_the_gpu_continues_the_run(cuda: torch.device, tmp_path: Path) -> None:
    full, _ = _train(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000003"
    assert checkpoint.is_dir()
    resumed, console = _train(tmp_path / "resumed", f"--run.resume={checkpoint}")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=0), (step, key)
    if cuda.type == "cuda":  # the run was on the GPU: the loop names the device its MFU peak comes from
        assert torch.cuda.get_device_name() in console, console[-2000:]
