"""The training loop with a small local engine (plain PyTorch, TrainEngine's interface): resume exactness,
pre-emption, non-finite handling, metrics records. The DeepSpeed engine itself is tested in tests/e2e.

``LocalEngine`` / ``single_topology`` are also the LLAMA_TRAIN_ENGINE / LLAMA_TRAIN_TOPOLOGY test hooks.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from model.llama import Llama, init_llama_weights
from train.config import EngineConfig, RunConfig
from train.health import NonFiniteAbort
from train.loop import train

pytestmark = pytest.mark.timeout(120)


def single_topology(cfg: Any = None) -> SimpleNamespace:
    return SimpleNamespace(global_rank=0, world_size=1, dp_size=1, dp_rank=0, tp_size=1, pp_size=1,
                           tp_rank=0, pp_rank=0, is_first_stage=True, is_last_stage=True)


class LocalEngine:
    """TrainEngine's interface over a plain PyTorch model and torch AdamW (one process)."""

    nan_at_steps: set[int] = set()
    preempt_at_step: int | None = None

    def __init__(self, *, model_cfg: Any, engine_cfg: EngineConfig, topology: Any) -> None:
        self.model = Llama(model_cfg)
        init_llama_weights(self.model, seed=engine_cfg.seed)
        o = engine_cfg.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.0, betas=(o.beta1, o.beta2), eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.accum, self.clip, self.steps = engine_cfg.grad_accum(topology.world_size), o.grad_clip, 0

    def _loss(self, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(mb["input_ids"], document_ids=mb["document_ids"])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), reduction="none")
        return (ce * mb["loss_mask"].flatten()).sum() / mb["loss_mask"].sum()

    def train_step(self, batches: Any, lr: float) -> SimpleNamespace:
        self.steps += 1
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for _ in range(self.accum):
            loss = self._loss(next(batches)) / self.accum
            loss.backward()
            total += loss.item()
        if self.steps in self.nan_at_steps:
            total = float("nan")
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        skipped = not (math.isfinite(total) and math.isfinite(norm))
        if not skipped:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.preempt_at_step == self.steps:
            os.kill(os.getpid(), signal.SIGUSR1)
        return SimpleNamespace(loss=total, grad_norm=norm, skipped=skipped, tokens=0)

    @torch.no_grad()
    def eval_loss(self, batches: Any, num_batches: int) -> float:
        return sum(float(self._loss(next(batches))) for _ in range(num_batches)) / num_batches

    def save(self, path: Path, client_state: dict) -> None:
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "client": client_state,
                    "steps": self.steps}, Path(path) / "engine.pt")

    def load(self, path: Path) -> dict:
        data = torch.load(Path(path) / "engine.pt", weights_only=False)
        self.model.load_state_dict(data["model"])
        self.opt.load_state_dict(data["opt"])
        self.steps = data["steps"]
        return data["client"]

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def _cfg(run_dir: Path, *extra: str) -> RunConfig:
    return RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", [
        f"--run.dir={run_dir}", "--train.steps=8", "--checkpoint.every=2", "--train.eval_every=4",
        "--train.log_every=100", *extra])


def _run(cfg: RunConfig) -> Any:
    return train(cfg, engine_factory=LocalEngine, topology_factory=single_topology, print_fn=lambda *a, **k: None)


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture(autouse=True)
def _no_peak_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_PEAK_FLOPS", "1e11")
    LocalEngine.nan_at_steps, LocalEngine.preempt_at_step = set(), None


def test_loop_writes_metrics_checkpoints_and_final_model(tmp_path: Path) -> None:
    result = _run(_cfg(tmp_path))
    assert result.reason == "completed" and result.exit_code == 0 and result.last_step == 8
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tflops_per_device", "mem_gb", "step_time_s"):
        assert all(isinstance(r[key], float) for r in recs), key
    cfg = _cfg(tmp_path)  # packed pretraining rows: the computed tokens are exactly global batch x seq_len
    assert all(r["tokens"] == cfg.train.global_batch_size * cfg.data.seq_len for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert [r["step"] for r in _records(tmp_path, "validation")] == [4, 8]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000006", "step_00000008"]  # keep_last = 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert (tmp_path / "final_model" / "model.safetensors").is_file()
    assert RunConfig.from_toml(tmp_path / "config.toml") == _cfg(tmp_path)


def test_preemption_then_resume_is_bit_exact(tmp_path: Path) -> None:
    ref = _run(_cfg(tmp_path / "ref"))
    assert ref.reason == "completed"
    LocalEngine.preempt_at_step = 3  # SIGUSR1 during step 3 -> checkpoint at step 3, exit 0
    first = _run(_cfg(tmp_path / "run"))
    assert first.reason == "preempted:SIGUSR1" and first.exit_code == 0 and first.last_step == 3
    LocalEngine.preempt_at_step = None
    second = _run(_cfg(tmp_path / "run", "--resume", "auto"))
    assert second.start_step == 3 and second.reason == "completed"
    a, b = _records(tmp_path / "ref"), _records(tmp_path / "run")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    from model.checkpoints.native import load_native

    _, wa = load_native(tmp_path / "ref" / "final_model")
    _, wb = load_native(tmp_path / "run" / "final_model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nonfinite_steps_are_skipped_then_abort(tmp_path: Path) -> None:
    LocalEngine.nan_at_steps = {2}
    result = _run(_cfg(tmp_path / "one"))
    assert result.skipped_steps == 1 and result.reason == "completed"
    assert [r["skipped"] for r in _records(tmp_path / "one")][:3] == [False, True, False]
    LocalEngine.nan_at_steps = {2, 3, 4}
    with pytest.raises(NonFiniteAbort, match="3 consecutive.*what to try"):
        _run(_cfg(tmp_path / "three", "--train.max_consecutive_nonfinite=3"))


class BrokenEngine(LocalEngine):
    """An engine whose step fails the way torch or DeepSpeed do: a ValueError from inside training."""

    def train_step(self, batches: Any, lr: float) -> SimpleNamespace:
        raise ValueError("an error inside training, not a config error")


def test_cli_one_line_for_config_errors_traceback_for_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from train.__main__ import main

    base = ["--config", "configs/pretrain/tiny_cpu.toml", f"--run.dir={tmp_path}", "--train.steps=2",
            "--logging.wandb=false"]
    assert main([*base, "--train.micro_batch_size=3"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid run config: train.global_batch_size=")
    assert main([*base, "--model.name=llama9_1b"]) == 2
    assert "'llama9_1b' is not a known model config" in capsys.readouterr().err
    monkeypatch.setenv("LLAMA_TRAIN_TOPOLOGY", "tests.unit.test_train_loop:single_topology")
    monkeypatch.setenv("LLAMA_TRAIN_ENGINE", "tests.unit.test_train_loop:BrokenEngine")
    with pytest.raises(ValueError, match="an error inside training"):
        main(base)
