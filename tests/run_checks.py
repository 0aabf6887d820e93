"""Checks of a finished run directory shared by the stage tests: figures that cannot lie (issue 23 item 5)."""

from __future__ import annotations

import json
from pathlib import Path


def assert_honest_mfu(run_dir: Path, *, max_tokens_per_step: int) -> None:
    """Every logged step: 0 < MFU <= 100% and at most ``max_tokens_per_step`` tokens counted (the tokens the
    model computed, never more than the batch could hold)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("type") == "train"]
    assert steps, f"{run_dir}: no training records"
    for r in steps:
        assert 0 < r["mfu"] <= 1.0, f"{run_dir} step {r['step']}: MFU {100 * r['mfu']:.1f}%"
        assert 0 < r["tokens"] <= max_tokens_per_step, f"{run_dir} step {r['step']}: {r['tokens']} tokens"
