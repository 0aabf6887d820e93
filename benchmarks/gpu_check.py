"""One GPU check: the ``gpu``-marked tests, then the MFU benchmark with the document mask on and off; JSON out.

    bash benchmarks/gpu_check.sh                        # on one CUDA GPU; < 8 min; writes the JSON below
    python benchmarks/gpu_check.py [--output benchmarks/results/gpu_check.json] [--skip-mfu]

What runs, in order, each under its own time limit so the whole stays under ``--budget-s`` (480 s):
1. ``pytest -m gpu tests/gpu`` (tests/gpu/*.py: a bf16 training step with flash attention and the document mask,
   KV-cache generation equal to the no-cache logits, checkpoint save + exact resume, a PPO rollout with the
   ZeRO-3 gathered copy, 2-process runs over gloo with CUDA tensors); every test's outcome goes to the JSON.
2. ``benchmarks/bench_gpu_mfu.py`` with ``--document-mask on`` (what users train) and ``off``.

``benchmarks/results/gpu_check.json``: ``device``, ``torch``, ``cuda``, ``checks`` (one entry per test and per
MFU run: ``"pass"`` / ``"fail"`` / ``"skip"`` with the message), ``mfu_document_mask_on``,
``mfu_document_mask_off``, the goal (MFU >= 50%) and whether it was met. Exit status 0 when every check passed.

Without CUDA it prints that there is nothing to check, writes nothing and exits 0: a CPU has no result to give
here (CI runs it that way, ``tests/e2e/test_gpu_check.py``, so the script itself stays working).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GOAL_MFU = 0.50


def device_record() -> dict[str, Any]:
    """What the JSON says about the machine: device, memory, SMs, torch / CUDA / cuDNN versions."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": props.name, "device_memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count, "compute_capability": f"{props.major}.{props.minor}",
            "device_count": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def parse_junit(path: Path) -> dict[str, dict[str, str]]:
    """``{test id: {"status": pass|fail|skip, "message": ...}}`` from pytest's ``--junitxml`` report."""
    checks: dict[str, dict[str, str]] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".removeprefix("tests.gpu.")
        status, message = "pass", ""
        for tag, outcome in (("failure", "fail"), ("error", "fail"), ("skipped", "skip")):
            element = case.find(tag)
            if element is not None:
                status, message = outcome, (element.get("message") or element.text or "")[:500]
                break
        checks[name] = {"status": status, "message": message, "seconds": case.get("time", "")}
    return checks


def run_gpu_tests(*, timeout_s: float, workdir: Path) -> dict[str, dict[str, str]]:
    """The ``gpu`` tests in one pytest process; a timeout or a crash is one failed check with the output tail."""
    report = workdir / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}"]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        tail = (done.stdout + done.stderr)[-1500:]
    except subprocess.TimeoutExpired as err:
        tail = f"timed out after {timeout_s:.0f} s: {str(err.stdout or '')[-1200:]}"
    checks = parse_junit(report) if report.is_file() else {}
    if not checks:
        checks["pytest -m gpu"] = {"status": "fail", "message": f"no test report; {tail}"}
    return checks


def run_mfu(*, document_mask: bool, timeout_s: float, workdir: Path,
            extra: list[str]) -> tuple[dict[str, str], dict[str, Any] | None]:
    """``bench_gpu_mfu.py`` once; (the check entry, its JSON or None)."""
    flag = "on" if document_mask else "off"
    out = workdir / f"mfu_{flag}.json"
    cmd = [sys.executable, "benchmarks/bench_gpu_mfu.py", "--document-mask", flag, "--output", str(out), *extra]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        failure = "" if done.returncode == 0 and out.is_file() else (done.stdout + done.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout_s:.0f} s"
    check = {"status": "fail" if failure else "pass", "message": failure,
             "seconds": f"{time.monotonic() - start:.1f}"}
    return check, (json.loads(out.read_text()) if not failure else None)


def summarize(device: dict[str, Any], checks: dict[str, dict[str, str]],
              mfu: dict[str, dict[str, Any] | None], *, elapsed_s: float, budget_s: float) -> dict[str, Any]:
    """The JSON record (module docstring)."""
    on, off = mfu.get("on"), mfu.get("off")
    result: dict[str, Any] = {
        "benchmark": "gpu_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **device,
        "checks": checks, "all_passed": all(c["status"] != "fail" for c in checks.values()),
        "mfu_document_mask_on": on["mfu"] if on else None, "mfu_document_mask_off": off["mfu"] if off else None,
        "mfu_runs": {k: v for k, v in mfu.items() if v is not None}, "goal_mfu": GOAL_MFU,
        "elapsed_s": elapsed_s, "budget_s": budget_s,
    }
    result["goal_met"] = bool(on and on["mfu"] >= GOAL_MFU)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time limit")
    p.add_argument("--tests-timeout-s", type=float, default=240.0)
    p.add_argument("--skip-mfu", action="store_true", help="only the gpu tests")
    p.add_argument("--mfu-arg", action="append", default=None,
                   help="passed to bench_gpu_mfu.py (default: --steps=8 --warmup=3, 5 measured steps, to fit the "
                        "budget); e.g. --mfu-arg=--steps=12 --mfu-arg=--warmup=4")
    args = p.parse_args(argv)
    args.mfu_arg = ["--steps=8", "--warmup=3"] if args.mfu_arg is None else args.mfu_arg
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
              "nothing was checked or measured and no JSON was written. Run `bash benchmarks/gpu_check.sh` on a "
              "machine with one GPU.")
        return 0
    start = time.monotonic()
    device = device_record()
    print(f"gpu_check on {device['device']} (torch {device['torch']}, CUDA {device['cuda']})", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        checks = run_gpu_tests(timeout_s=args.tests_timeout_s, workdir=workdir)
        mfu: dict[str, dict[str, Any] | None] = {}
        if not args.skip_mfu:
            for flag, masked in (("on", True), ("off", False)):
                left = args.budget_s - (time.monotonic() - start)
                per_run = max(30.0, left / (2 if flag == "on" else 1))
                checks[f"bench_gpu_mfu document_mask={flag}"], mfu[flag] = run_mfu(
                    document_mask=masked, timeout_s=per_run, workdir=workdir, extra=args.mfu_arg)
    result = summarize(device, checks, mfu, elapsed_s=time.monotonic() - start, budget_s=args.budget_s)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name, check in checks.items():
        print(f"{check['status']:>4}  {name}" + (f": {check['message'][:200]}" if check["message"] else ""))
    print(f"MFU document mask on {result['mfu_document_mask_on']}, off {result['mfu_document_mask_off']} "
          f"(goal >= {GOAL_MFU}); {result['elapsed_s']:.0f} s; wrote {args.output}")
    return 0 if result["all_passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
