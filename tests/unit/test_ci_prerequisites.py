"""``tests/conftest.py``'s rule: a test missing the shared data or the C compiler skips locally and FAILS under
``CI=true``; the unit checks of the helper, then real tests of the suite run by pytest in a child process with
the data pointed away and the compiler replaced by ``false``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, in_ci, missing_prerequisite

pytestmark = pytest.mark.timeout(240)

# One test that reads the shared data, one that needs the compiled kernels: both fast.
DATA_TEST = "tests/unit/test_tokenizer.py::test_llama2_ids_and_specials"
KERNEL_TEST = "tests/unit/test_kernels.py::test_linear_matches_f_linear"


@pytest.mark.parametrize("value,expected", [("true", True), ("TRUE", True), ("1", True), ("", False),
                                            ("false", False), ("0", False)])
def test_in_ci_reads_the_ci_variable(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_missing_prerequisite_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="missing prerequisite: no data"):
        missing_prerequisite("no data")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*no data"):
        missing_prerequisite("no data")


def _pytest_child(tmp_path: Path, *, ci: bool) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(LLAMA_DATA_DIR=str(tmp_path / "no-data-here"), CC="false",
               LLAMA_KERNEL_CACHE=str(tmp_path / "kernels"), PYTHONPATH=str(REPO_ROOT))
    env.pop("LLAMA_CPU_KERNELS", None)
    if ci:
        env["CI"] = "true"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf", DATA_TEST,
                           KERNEL_TEST], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=200)
    return done.returncode, done.stdout + done.stderr


def test_the_suite_fails_in_ci_where_it_would_skip(tmp_path: Path) -> None:
    rc, out = _pytest_child(tmp_path, ci=False)
    assert rc == 0 and re.search(r"\b2 skipped\b", out), out[-3000:]
    assert "real data not found" in out and "fused CPU kernels unavailable" in out
    rc, out = _pytest_child(tmp_path, ci=True)
    assert rc == 1 and re.search(r"\b2 errors\b", out), out[-3000:]  # both fail in their fixtures' setup
    assert out.count("missing prerequisite under CI=true") >= 2, out[-3000:]
