"""Shared pytest fixtures: where the real public data lives, and skips when it is absent.

The real data (tokenizers, corpora samples, the stories260K checkpoint) is never committed; it is read
from ``$LLAMA_DATA_DIR`` (default ``../shared/data`` next to the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The directory holding the real public data (``$LLAMA_DATA_DIR`` or ``../shared/data``)."""
    return Path(os.environ.get("LLAMA_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory; skips the test with the reason when it is not on this machine."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}: set LLAMA_DATA_DIR to the shared data directory")
    return path


def require_file(path: Path) -> Path:
    """Skip (with the path in the reason) when one expected data file is missing."""
    if not path.exists():
        pytest.skip(f"data file not found: {path} (set LLAMA_DATA_DIR)")
    return path
