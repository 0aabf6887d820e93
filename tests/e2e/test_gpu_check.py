"""``benchmarks/gpu_check.sh`` stays working where CI runs it (no CUDA), and its report is assembled right.

Without CUDA the script must say so, exit 0 and write nothing (no pretend result). The report parts are checked
on a real pytest JUnit file (pass, fail, skip) and on the MFU summaries, since the CUDA branch itself can only
run on a GPU (``tests/gpu``, ``bash benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(120)


def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu_check.sh would really run")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--output", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout and "no JSON was written" in done.stdout
    assert not out.exists()


def test_report_from_a_real_junit_file_and_the_mfu_runs(tmp_path: Path) -> None:
    tests = tmp_path / "test_sample.py"
    tests.write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_broken(): assert 1 == 2, "kv cache drifted"
        def test_not_here(): pytest.skip("no CUDA device")
    """))
    report = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests),
                    f"--junitxml={report}", "--rootdir", str(tmp_path)], cwd=tmp_path, capture_output=True,
                   timeout=60)
    gpu_check = _gpu_check()
    checks = gpu_check.parse_junit(report)
    by_test = {name.split("::")[-1]: check for name, check in checks.items()}
    assert {k: v["status"] for k, v in by_test.items()} == {"test_ok": "pass", "test_broken": "fail",
                                                            "test_not_here": "skip"}
    assert "kv cache drifted" in by_test["test_broken"]["message"]
    device = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda": "12.x"}
    mfu = {"on": {"mfu": 0.52}, "off": {"mfu": 0.49}}
    result = gpu_check.summarize(device, checks, mfu, elapsed_s=300.0, budget_s=480.0)
    assert result["mfu_document_mask_on"] == 0.52 and result["mfu_document_mask_off"] == 0.49
    assert result["goal_met"] is True and result["all_passed"] is False  # test_broken failed
    assert result["device"] == "NVIDIA H100 80GB HBM3" and result["checks"] is checks
    failed_mfu = gpu_check.summarize(device, {}, {"on": None, "off": {"mfu": 0.6}}, elapsed_s=1, budget_s=480)
    assert failed_mfu["mfu_document_mask_on"] is None and failed_mfu["goal_met"] is False
