"""The SFT / reward-model root configs: presets, overrides, TOML round trip, steps and warmup from the data,
errors that name the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import checkpoint_model_config
from rlhf.paths import file_list, resolve_path
from rlhf.reward.config import RewardConfig
from rlhf.sft.config import SFTConfig
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)
PRESETS = sorted((REPO_ROOT / "configs" / "rlhf").glob("*.toml"))


def _cls(path: Path) -> type:
    return SFTConfig if path.name.startswith("sft") else RewardConfig


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.name.startswith(("sft", "rm_"))], ids=lambda p: p.name)
def test_presets_load_and_round_trip(preset: Path, tmp_path: Path) -> None:
    cfg = _cls(preset).from_toml(preset)
    assert cfg.train.steps == 0, "stage presets take their step count from the data"
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert _cls(preset).from_toml(tmp_path / "c.toml") == cfg


def test_llama2_presets_carry_the_papers_hyperparameters() -> None:
    sft = SFTConfig.from_toml(REPO_ROOT / "configs/rlhf/sft_llama2.toml")
    assert (sft.sft.epochs, sft.optim.lr, sft.optim.weight_decay, sft.train.global_batch_size, sft.data.seq_len) == (
        2, 2e-5, 0.1, 64, 4096)
    for kind in ("helpfulness", "safety"):
        rm = RewardConfig.from_toml(REPO_ROOT / f"configs/rlhf/rm_{kind}_llama2.toml")
        assert rm.rm.mixture == kind and rm.rm.epochs == 1 and rm.optim.lr == 1e-5 and rm.optim.min_lr_ratio == 0.1
        assert (rm.rm.warmup_fraction, rm.rm.min_warmup_steps, rm.train.global_batch_size) == (0.03, 5, 512)
        assert rm.rm.safety_fraction == 0.9


def test_overrides_and_unknown_keys() -> None:
    cfg = RewardConfig.from_toml(None, ["--rm.margin=large", "--rm.epochs", "2", "--train.global_batch_size=16"])
    assert (cfg.rm.margin, cfg.rm.epochs, cfg.train.global_batch_size, cfg.train.steps) == ("large", 2, 16, 0)
    with pytest.raises(ValueError, match=r"unknown key 'margins' in \[rm\]; valid keys: .*'margin'"):
        RewardConfig.from_toml(None, ["--rm.margins=large"])
    with pytest.raises(ValueError, match=r"unknown section 'rm'.*'sft'"):
        SFTConfig.from_toml(None, ["--rm.margin=large"])
    with pytest.raises(ValueError, match="rm.epochs: expected an integer"):
        RewardConfig.from_toml(None, ["--rm.epochs=two"])
    with pytest.raises(ValueError, match="does not exist; presets are in configs/rlhf/"):
        SFTConfig.from_toml("configs/rlhf/nope.toml")


def _rm(tmp_path: Path, *extra: str) -> RewardConfig:
    (tmp_path / "tok.model").write_bytes(b"x")
    (tmp_path / "p.jsonl").write_text("{}\n")
    return RewardConfig.from_toml(None, [f"--data.tokenizer={tmp_path / 'tok.model'}",
                                         f"--rm.helpful_files={tmp_path / 'p.jsonl'}", "--train.steps=1", *extra])


def test_validation_names_the_field_and_the_fix(tmp_path: Path) -> None:
    _rm(tmp_path).validate(world_size=1)
    cases = {
        "--rm.margin=huge": "rm.margin='huge': use one of",
        "--rm.mixture=safety": "rm.mixture=\"safety\" needs rm.safety_files",
        "--rm.mixture=half": "rm.mixture='half'",
        f"--rm.safety_files={tmp_path / 'missing.jsonl'}": "rm.safety_files: .*missing.jsonl does not exist",
        "--rm.template=chatml": "rm.template='chatml'",
        "--data.tokenizer=": "data.tokenizer is empty: set --data.tokenizer=PATH",
        "--rm.valid_fraction=1.5": r"rm.valid_fraction=1.5: must be in \[0, 1\)",
        "--data.synthetic=true": "data.synthetic=true: rm reads the files of \\[rm\\]",
        "--parallel.tp=3": "parallel.tp=3 does not divide n_heads=4",
        "--parallel.pp=2": "parallel.pp=2: the reward model runs under tensor parallelism and ZeRO 1-3 but not",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            _rm(tmp_path, override).validate(world_size=1)
    with pytest.raises(ValueError, match=r"sft.files is empty"):
        SFTConfig.from_toml(None, [f"--data.tokenizer={tmp_path / 'tok.model'}", "--train.steps=1"]).validate()


def test_steps_and_warmup_from_the_data(tmp_path: Path) -> None:
    cfg = _rm(tmp_path, "--train.steps=0", "--train.global_batch_size=32", "--train.micro_batch_size=4")
    resolved = cfg.with_schedule(num_samples=32 * 500 + 7)
    assert resolved.train.steps == 500 and resolved.optim.warmup_steps == 15  # 3% of 500
    assert cfg.with_schedule(num_samples=32 * 40).optim.warmup_steps == 5  # ... but at least 5
    with pytest.raises(ValueError, match=r"train.steps=50 needs 1600 samples but the data gives 320.*lower it to 10"):
        cfg.replace(train={"steps": 50}).with_schedule(num_samples=320)
    with pytest.raises(ValueError, match="do not fill one global batch of 32"):
        cfg.with_schedule(num_samples=31)


def test_paths_and_init_checkpoint_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_DATA_DIR", str(tmp_path))
    assert resolve_path("{data_dir}/a/b.jsonl") == tmp_path / "a/b.jsonl"
    assert file_list(" x.jsonl, ,{data_dir}/y.jsonl") == [Path("x.jsonl"), tmp_path / "y.jsonl"]
    from model.checkpoints import save_checkpoint
    from model.config import get_config
    from model.llama import Llama

    cfg = get_config("debug_tiny").replace(n_layers=1)
    save_checkpoint(Llama(cfg), cfg, tmp_path / "run" / "final_model")
    assert checkpoint_model_config(tmp_path / "run") == cfg  # a run dir means its final_model/
    rm = _rm(tmp_path, f"--rm.init_checkpoint={tmp_path / 'run'}", "--model.name=llama2_70b")
    assert rm.model_config() == cfg, "the init checkpoint decides the shape, not model.name"
    with pytest.raises(ValueError, match="init_checkpoint .*nowhere: no such file"):
        checkpoint_model_config(tmp_path / "nowhere")
