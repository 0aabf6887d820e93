"""Two processes on one GPU over gloo with CUDA tensors: ``model.comm`` and a TP2 forward/backward.

A one-GPU machine cannot run NCCL with two ranks (NCCL refuses two ranks on one device), so the multi-rank code
paths get this check instead (``run_gloo_cuda.py``): every ``model.comm`` function with CUDA tensors gives the
value it must, and the megatron-core TP2 model on the GPU over gloo equals the unsharded model within 1e-5
(loss, logits slice, gathered logits, every gradient slice). NCCL itself needs two GPUs: not covered here.
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


def test_two_ranks_on_one_gpu_over_gloo(cuda: torch.device, tmp_path: Path) -> None:
    out = tmp_path / "gloo_cuda.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO_ROOT / "tests" / "gpu" / "run_gloo_cuda.py"), str(out), cuda.type]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["device"].startswith(cuda.type)
    assert all(result["comm"].values()), result["comm"]
    assert max(result["tensor_parallel"].values()) <= 1e-5, result["tensor_parallel"]
