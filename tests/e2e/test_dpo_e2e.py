"""``python -m rlhf.dpo`` end to end (real DeepSpeed engine, one process, CPU): kill -9 after step 3, then a rerun
with the same run directory resumes and repeats the uninterrupted run bit for bit (losses, dpo/ metrics, final
weights, held-out evaluation); ``python -m train.report`` plots the DPO metrics (run: ``pytest tests/e2e/test_dpo_e2e.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.distributed.rlhf_parity_config import COMMON, STAGE, make_parity_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def command(data: Path, run_dir: Path) -> list[str]:
    args = [a for a in COMMON if not a.startswith(("--train.steps", "--checkpoint.every"))]
    return [sys.executable, "-m", "rlhf.dpo", *args, *STAGE["dpo"], "--train.steps=6", "--checkpoint.every=2",
            "--checkpoint.async_save=false", f"--dpo.files={data / 'prefs.jsonl'}",
            f"--data.tokenizer={data / 'tok.model'}", f"--dpo.init_checkpoint={data / 'init'}", f"--run.dir={run_dir}"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def records(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("type") == "train":
            out[rec["step"]] = rec
    return out


def test_kill9_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    data = make_parity_data(tmp_path / "data")
    full = tmp_path / "full"
    done = subprocess.run(command(data, full), cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(command(data, run), cwd=REPO_ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and max(records(run), default=0) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-way (after step 3, before the end)"
    assert not (run / "final_model").exists()
    again = subprocess.run(command(data, run), cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]

    ours, ref = records(run), records(full)
    assert sorted(ours) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        for key in ("loss", "grad_norm", "dpo/reward_accuracy", "dpo/reward_margin", "dpo/nll"):
            assert ours[step][key] == ref[step][key], (step, key)
    a, b = load_file(run / "final_model" / "model.safetensors"), load_file(full / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert json.loads((run / "dpo_eval.json").read_text()) == json.loads((full / "dpo_eval.json").read_text())
    assert json.loads((run / "final_model" / "rlhf.json").read_text())["stage"] == "dpo"

    report = subprocess.run([sys.executable, "-m", "train.report", str(full)], cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (full / "report" / "all_metrics.png").is_file()
