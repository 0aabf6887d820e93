"""Run config: presets load and validate, overrides coerce, unknown keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import get_config, known_configs
from train.config import RunConfig, parse_overrides
from train.schedule import lr_at, schedule_from_config

pytestmark = pytest.mark.timeout(60)

PRESETS = sorted(Path("configs/pretrain").glob("*.toml"))
PUBLISHED = [n for n in known_configs() if not n.startswith(("debug", "bench"))]


def test_a_preset_per_published_size() -> None:
    assert {p.stem for p in PRESETS} >= set(PUBLISHED) | {"tiny_cpu", "tiny_real_data"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_validates(path: Path) -> None:
    cfg = RunConfig.from_toml(path)
    mp = cfg.parallel.tp * cfg.parallel.pp
    for dp in (1, 8) if cfg.model.name in PUBLISHED else (1, 2) if path.stem == "tiny_cpu" else (1,):
        cfg.validate(world_size=mp * dp)
    if cfg.model.name in PUBLISHED:
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        assert tokens == (16 if "405b" in path.stem else 4) * 2**20
        assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.95, 1e-5)
        assert (cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.1, 1.0)
        size = get_config(cfg.model.name).num_params()
        want = 8e-5 if "405b" in path.stem else (3e-4 if size < 20e9 else 1.5e-4)
        assert cfg.optim.lr == want
        assert cfg.optim.warmup_steps == (8000 if "405b" in path.stem else 2000)


def test_overrides_both_spellings_and_coercion() -> None:
    cfg = RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", [
        "--train.steps=7", "--optim.lr", "1e-3", "--zero.offload=true", "--resume", "auto",
        "--model.overrides.vocab_size=1024", "--data.seq_len", "32"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.zero.offload is True
    assert cfg.run.resume == "auto" and cfg.data.seq_len == 32
    assert cfg.model_config().vocab_size == 1024
    assert parse_overrides(["--optim.lr", "-1"]) == [("optim.lr", "-1")]


@pytest.mark.parametrize("override, match", [
    (["--train.stepz=3"], r"unknown key 'stepz' in \[train\]; valid keys: .*'steps'"),
    (["--trian.steps=3"], r"unknown section 'trian'; valid sections"),
    (["--train.steps=three"], r"train.steps: expected an integer, got 'three'"),
    (["--zero.offload=maybe"], r"zero.offload: expected true/false"),
    (["--model.overrides.widthh=3"], r"unknown \[model.overrides\] key"),
    (["--train.steps"], r"has no value"),
])
def test_bad_overrides_are_named(override: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", override)


@pytest.mark.parametrize("override, world, match", [
    (["--train.global_batch_size=6", "--train.micro_batch_size=4"], 1, "not a multiple of"),
    (["--train.global_batch_size=8", "--train.micro_batch_size=4"], 3, "divisible by micro_batch_size x dp"),
    (["--parallel.tp=3"], 3, "does not divide n_heads"),
    (["--parallel.pp=2", "--zero.stage=2"], 2, "only ZeRO 0/1"),
    (["--data.seq_len=4096"], 1, "exceeds model 'debug_tiny' max_seq_len=256"),
    (["--train.dtype=fp16"], 1, "use \"fp32\" or \"bf16\""),
    (["--data.synthetic=false"], 1, "data.path is empty"),
    (["--parallel.tp=2"], 3, "not a multiple of tp x pp x cp = 2 x 1 x 1"),
    (["--model.overrides.dim=96", "--model.overrides.n_heads=6", "--model.overrides.n_kv_heads=3",
      "--parallel.tp=2"], 2, "kv heads are split when tp divides them and replicated"),
    (["--model.overrides.vocab_size=510", "--parallel.tp=4"], 4, "set --model.overrides.vocab_size=512"),
    (["--zero.stage=0"], 1, "use 1, 2 or 3"),
    (["--parallel.pp=2", "--model.overrides.tie_embeddings=true"], 2, "pipeline stages need an untied head"),
    (["--parallel.pp=5"], 5, "exceeds the 4 pipeline entries"),
])
def test_validate_quotes_value_and_fix(override: list[str], world: int, match: str) -> None:
    cfg = RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", override)
    with pytest.raises(ValueError, match=match):
        cfg.validate(world_size=world)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = RunConfig.from_toml("configs/pretrain/llama3_1_405b.toml", ["--model.overrides.n_layers=4"])
    cfg.save_toml(tmp_path / "config.toml")
    assert RunConfig.from_toml(tmp_path / "config.toml") == cfg


def test_schedule_warmup_cosine_floor() -> None:
    assert lr_at(0, peak=1.0, warmup=10, total=110, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(9, peak=1.0, warmup=10, total=110, min_lr=0.1) == pytest.approx(1.0)
    assert lr_at(10, peak=1.0, warmup=10, total=110, min_lr=0.1) == pytest.approx(1.0)
    assert lr_at(60, peak=1.0, warmup=10, total=111, min_lr=0.1) == pytest.approx(0.55)
    assert lr_at(109, peak=1.0, warmup=10, total=110, min_lr=0.1) == pytest.approx(0.1)
    cfg = RunConfig.from_toml("configs/pretrain/llama3_1_405b.toml")
    sched = schedule_from_config(cfg)
    assert sched(7999) == pytest.approx(8e-5) and sched(cfg.train.steps - 1) == pytest.approx(8e-7)
