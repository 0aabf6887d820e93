"""Fixtures of the ``gpu`` tests: the CUDA device, or a skip (no CUDA is not a missing prerequisite: also in CI).

    bash benchmarks/gpu_check.sh            # runs every test here (pytest -m gpu tests/gpu), then the MFU bench

``LLAMA_GPU_TESTS_DRY_RUN_ON_CPU=1`` runs the tests that can on the CPU instead: a check of the test code's own
plumbing while developing it without a GPU, never a GPU result (``gpu_check.sh`` refuses to run without CUDA).
"""

from __future__ import annotations

import os

import pytest
import torch


def dry_run_on_cpu() -> bool:
    return not torch.cuda.is_available() and os.environ.get("LLAMA_GPU_TESTS_DRY_RUN_ON_CPU") == "1"


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    """The GPU every test here runs on; skips without CUDA (see the module docstring for the CPU dry run)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if dry_run_on_cpu():
        return torch.device("cpu")
    pytest.skip("no CUDA device: the gpu tests run on a GPU (bash benchmarks/gpu_check.sh)")


@pytest.fixture
def cuda_only(cuda: torch.device) -> torch.device:
    """For the tests whose subject is CUDA itself (kernels, NCCL-free CUDA collectives): no CPU dry run."""
    if cuda.type != "cuda":
        pytest.skip("this check has no CPU dry run")
    return cuda


@pytest.fixture(autouse=True)
def exact_fp32_matmuls() -> None:
    """fp32 comparisons mean fp32: TF32 off (PyTorch's default for matmuls, set explicitly)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)
