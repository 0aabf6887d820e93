"""Ghost Attention end to end on the real stories260K model (``benchmarks/gatt_tiny.py`` at a small size):
``python -m rlhf.gatt train`` (multi-turn SFT baseline), ``build``, ``train`` (GAtt), ``eval``.

The instruction "end every answer with the word X." is learnable by this tiny model; given only in the first
user message, the baseline follows it at turn 1 and forgets it after, and GAtt makes it hold at turn >= 4.
The full-size run and its table are in ``benchmarks/RESULTS.md``. Skips without the shared data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require_file
from tests.run_checks import assert_honest_mfu
from train.config import tomllib

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_gatt_makes_the_first_turn_instruction_last(shared_data: Path, tmp_path: Path) -> None:
    require_file(shared_data / "checkpoints" / "stories260K" / "stories260K.bin")
    require_file(shared_data / "checkpoints" / "stories260K" / "tok512.model")
    out = tmp_path / "result.json"
    cmd = [sys.executable, "benchmarks/gatt_tiny.py", "--work", str(tmp_path / "work"), "--base-steps", "90",
           "--gatt-steps", "80", "--gatt-lr", "1e-3", "--base-dialogues", "300", "--gatt-dialogues", "128",
           "--eval-dialogues", "12", "--turns", "4", "--seq-len", "192", "--output", str(out)]
    env = {**os.environ, "LLAMA_DATA_DIR": str(shared_data), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in (tmp_path / "work" / "base", tmp_path / "work" / "gatt"):  # short padded dialogues
        cfg = tomllib.loads((run / "config.toml").read_text())
        assert_honest_mfu(run, max_tokens_per_step=cfg["train"]["global_batch_size"] * cfg["data"]["seq_len"])
    models = json.loads(out.read_text())["adherence"]["models"]
    before = [r["rate"] for r in models["before GAtt"]["adherence"]]
    after = [r["rate"] for r in models["after GAtt"]["adherence"]]
    assert before[0] >= 0.75, before  # the baseline follows an instruction in the current message
    assert before[3] <= 0.25, before  # ... and forgets one given only in the first message
    assert after[3] >= before[3] + 0.5, (before, after)  # turn 4
    built = [json.loads(line) for line in (tmp_path / "work" / "gatt.jsonl").read_text().splitlines()]
    first_users = [d["messages"][0]["content"] for d in built]
    assert all(u.startswith(("end every answer", "word:")) for u in first_users)
    later = [m["content"] for d in built for m in d["messages"][2::2]]
    assert later and not any(u.startswith(("end every answer", "word:")) for u in later)
