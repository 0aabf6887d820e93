"""Metrics helpers: MFU arithmetic, console line, JSONL truncation on resume, wandb mode, health monitor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.config import get_config, model_flops_per_token
from train.health import HealthMonitor, NonFiniteAbort, describe_collective_timeout
from train.metrics import Throughput, console_line, format_eta, truncate_jsonl, wandb_mode

pytestmark = pytest.mark.timeout(60)


def test_mfu_uses_planner_flops() -> None:
    cfg = get_config("llama2_7b")
    fpt = model_flops_per_token(cfg, 4096)
    t = Throughput(flops_per_token=fpt, peak_flops=989e12, devices=8).measure(8 * 4096, 1.0)
    assert t["tokens_per_s"] == 8 * 4096
    assert t["mfu"] == pytest.approx(fpt * 4096 / 989e12)
    assert t["tflops_per_device"] == pytest.approx(fpt * 4096 / 1e12)


def test_console_line_and_eta() -> None:
    rec = {"step": 3, "loss": 5.123456, "lr": 3e-4, "grad_norm": 1.5, "tokens_per_s": 12345.6,
           "tflops_per_device": 0.5, "mfu": 0.456, "step_time_s": 0.25, "mem_gb": 1.5}
    line = console_line(rec, total_steps=10, eta_s=83)
    assert line.startswith("step 3/10 | loss 5.1235 | lr 3.00e-04 | gnorm 1.500 | 12,346 tok/s")
    assert "MFU 45.6%" in line and line.endswith("ETA 0:01:23")
    assert format_eta(float("nan")) == "?"


def test_truncate_jsonl_drops_replayed_steps_and_cut_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"type": "train", "step": s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"type": "tra')
    truncate_jsonl(path, after_step=3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_wandb_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_mode("") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_health_monitor() -> None:
    h = HealthMonitor(max_consecutive_nonfinite=2, spike_factor=2.0)
    for step in range(1, 13):
        assert h.observe(step, loss=3.0, grad_norm=1.0, skipped=False) == "ok"
    assert h.observe(13, loss=9.0, grad_norm=1.0, skipped=False) == "spike"
    assert h.observe(14, loss=float("nan"), grad_norm=1.0, skipped=True) == "skipped"
    assert h.observe(15, loss=3.0, grad_norm=1.0, skipped=False) == "ok"
    h.observe(16, loss=3.0, grad_norm=float("inf"), skipped=False)
    with pytest.raises(NonFiniteAbort, match="2 consecutive.*what to try: lower optim.lr"):
        h.observe(17, loss=float("nan"), grad_norm=float("nan"), skipped=True)
    assert h.skipped_total == 3 and h.spikes == 1
    msg = describe_collective_timeout(RuntimeError("Timed out"), rank=3, op="all_reduce", timeout_s=60)
    assert msg.startswith("rank 3: collective 'all_reduce' did not complete within 60 s")


def test_mfu_counts_the_tokens_actually_computed() -> None:
    """Short padded batches (SFT, GAtt) and two rows per pair (RM) count what the model computed, at its length."""
    import torch

    from train.metrics import ComputedTokens

    cfg = get_config("debug_tiny")
    batches = [{"input_ids": torch.zeros(4, 24, dtype=torch.long)}, {"input_ids": torch.zeros(2 * 3, 40)}]
    counter = ComputedTokens(iter(batches), cfg)
    assert [next(counter), next(counter)] == batches
    tokens, flops = counter.pop()
    assert tokens == 4 * 24 + 6 * 40
    assert flops == pytest.approx(96 * model_flops_per_token(cfg, 24) + 240 * model_flops_per_token(cfg, 40))
    assert counter.pop() == (0, 0.0)
    # The configured global_batch x seq_len (8 x 256) would claim 2048 tokens for this step: 6x too many.
    tp = Throughput(flops_per_token=model_flops_per_token(cfg, 256), peak_flops=1e12, devices=1)
    honest, inflated = tp.measure(tokens, 1.0, flops=flops), tp.measure(8 * 256, 1.0)
    assert honest["tokens_per_s"] == 336 and honest["mfu"] < inflated["mfu"] / 6
