"""Shared pytest fixtures: where the real public data lives, and what happens when a prerequisite is missing.

The real data (tokenizers, corpora samples, the stories260K checkpoint) is never committed; it is read
from ``$LLAMA_DATA_DIR`` (default ``../shared/data`` next to the repository).

A test whose prerequisite is missing here (the shared data, a C compiler for the fused CPU kernels) goes
through ``missing_prerequisite``: on a developer's machine it skips with the reason; under ``CI=true`` it FAILS,
so a CI run can never pass while silently not exercising a path. Skips that are not a missing prerequisite
(no CUDA for the ``gpu`` tests, a torch build without oneDNN) stay skips everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The directory holding the real public data (``$LLAMA_DATA_DIR`` or ``../shared/data``)."""
    return Path(os.environ.get("LLAMA_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()


def in_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as GitHub Actions, GitLab and most runners set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_prerequisite(reason: str) -> NoReturn:
    """Skip with ``reason`` locally; fail with it under ``CI=true`` (CI must run every path it claims to)."""
    if in_ci():
        pytest.fail(f"missing prerequisite under CI=true (would skip locally): {reason}", pytrace=False)
    pytest.skip(f"missing prerequisite: {reason}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory; skips (fails under CI=true) with the reason when it is not on this machine."""
    path = shared_data_dir()
    if not path.is_dir():
        missing_prerequisite(f"real data not found at {path}: set LLAMA_DATA_DIR to the shared data directory")
    return path


def require_file(path: Path) -> Path:
    """Skip (fail under CI=true), with the path in the reason, when one expected data file is missing."""
    if not path.exists():
        missing_prerequisite(f"data file not found: {path} (set LLAMA_DATA_DIR)")
    return path


@pytest.fixture
def fused_cpu_kernels() -> None:
    """The fused CPU kernels are built and on; else skip (fail under CI=true when the C build failed).

    ``LLAMA_CPU_KERNELS=0`` (a run of the suite on the eager path) and a torch build without oneDNN are choices
    of the run, not missing prerequisites: those skip everywhere."""
    from model import kernels, prepack
    from model.kernels import build

    if kernels.enabled():
        return
    if not prepack.available():
        pytest.skip("this torch build has no oneDNN linear ops (the fused path needs them)")
    if build.last_error == "LLAMA_CPU_KERNELS=0":
        pytest.skip("LLAMA_CPU_KERNELS=0: the fused CPU path is switched off in this run")
    missing_prerequisite(f"{build.last_error} (the fused CPU kernels need a C compiler)")
