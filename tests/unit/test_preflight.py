"""Pre-flight (``train/preflight.py``): the run's training state per process vs this machine's memory, checked
before anything is allocated; the 7B preset on a 24 GiB CPU machine stops with the estimate and the fix."""

from __future__ import annotations

import pytest

import train.loop
import train.preflight
from model.config import get_config
from train.__main__ import main
from train.preflight import GIB, state_bytes_per_process

pytestmark = pytest.mark.timeout(120)


def test_state_bytes_follow_the_layout() -> None:
    cfg = get_config("llama2_7b")
    p = cfg.num_params()
    assert state_bytes_per_process(cfg, tp=1, pp=1, dp=1, zero_stage=0, dtype="bf16") == 16 * p
    assert state_bytes_per_process(cfg, tp=1, pp=1, dp=1, zero_stage=0, dtype="fp32") == 16 * p
    # ZeRO-3 over 8 ranks shards all of it; TP2 halves each rank's share first.
    assert state_bytes_per_process(cfg, tp=1, pp=1, dp=8, zero_stage=3, dtype="bf16") == pytest.approx(2 * p)
    assert state_bytes_per_process(cfg, tp=2, pp=1, dp=1, zero_stage=1, dtype="bf16") == pytest.approx(8 * p)
    # ZeRO-1 shards the 12 B of fp32 master + Adam states only.
    assert state_bytes_per_process(cfg, tp=1, pp=1, dp=4, zero_stage=1, dtype="bf16") == pytest.approx((4 + 3) * p)


def test_7b_on_a_24_gib_cpu_machine_refuses_before_allocating(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(train.preflight, "machine_memory", lambda: (24 * GIB, "CPU RAM"))

    def no_topology(*_: object, **__: object) -> None:
        raise AssertionError("the pre-flight must refuse before the topology, data or model are built")

    monkeypatch.setattr(train.loop, "default_topology", no_topology)
    assert main(["--config", "configs/pretrain/llama2_7b.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "model.name='llama2_7b' (6.74B parameters) needs ~100 GiB per process" in err
    assert "this machine has 24 GiB (CPU RAM)" in err and "--model.name debug_15m" in err
    assert "python -m launch plan llama2_7b" in err


def test_a_model_that_fits_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    from train.config import RunConfig
    from train.preflight import check_memory

    monkeypatch.setattr(train.preflight, "machine_memory", lambda: (24 * GIB, "CPU RAM"))
    cfg = RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", [])
    check_memory(cfg, cfg.model_config(), world_size=1)
    big = RunConfig.from_toml("configs/pretrain/llama2_7b.toml", ["--train.preflight=false"])
    check_memory(big, big.model_config(), world_size=1)  # switched off
