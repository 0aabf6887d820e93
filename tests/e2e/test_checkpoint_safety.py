"""A checkpoint from someone else cannot run code: every file is safetensors or JSON, and a file replaced by a
pickle is refused with an error naming it, even when the attacker also rewrites meta.json's checksums.

    pytest tests/e2e/test_checkpoint_safety.py
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TINY = ["--config", "configs/pretrain/tiny_cpu.toml", "--train.steps=2", "--checkpoint.every=2",
        "--train.eval_every=0", "--train.log_every=1"]


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "train", *TINY, f"--run.dir={run_dir}", *extra], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=240)


def _forge(step_dir: Path, relative: str, payload: bytes) -> None:
    """Replace one file and re-seal meta.json + COMPLETE as a careful attacker would."""
    (step_dir / relative).write_bytes(payload)
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["files"][relative] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    digest = hashlib.sha256((step_dir / "meta.json").read_bytes()).hexdigest()
    (step_dir / "COMPLETE").write_text(f"sha256 {digest}\n")


def test_no_pickle_is_written_and_a_forged_pickle_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _run(run)
    assert first.returncode == 0, first.stderr[-3000:]
    step_dir = run / "checkpoints" / "step_00000002"
    files = json.loads((step_dir / "meta.json").read_text())["files"]
    assert files and all(name.endswith((".safetensors", ".json")) for name in files), sorted(files)
    for path in step_dir.rglob("*"):
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), f"{path} is a pickle"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(marker), protocol=2)
    for victim in ("portable/tp00-pp00-dp000.safetensors", "rng/rank_00000.json"):
        copy = tmp_path / f"copy-{victim.replace('/', '_')}"
        subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
        target = copy / "checkpoints" / "step_00000002"
        _forge(target, victim, payload)
        resumed = _run(copy, "--resume", str(target), "--train.steps=3")
        assert resumed.returncode == 2, (victim, resumed.stdout[-2000:], resumed.stderr[-3000:])
        assert str(target / victim) in resumed.stderr, resumed.stderr[-3000:]
        assert not marker.exists(), f"the pickle in {victim} ran"
