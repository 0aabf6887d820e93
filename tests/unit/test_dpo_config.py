"""DPO config and presets: the Llama 3 values they carry, round trips, refusals naming the fix, the pair encoding
and batch layout (run: ``pytest tests/unit/test_dpo_config.py``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from rlhf.dpo.config import DPOConfig
from tests.conftest import REPO_ROOT, require_file
from train.config_reader import ConfigError

pytestmark = pytest.mark.timeout(120)
PRESETS = sorted((REPO_ROOT / "configs" / "rlhf").glob("dpo_*.toml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load_and_round_trip(preset: Path, tmp_path: Path) -> None:
    cfg = DPOConfig.from_toml(preset)
    assert cfg.train.steps == 0 and cfg.dpo.beta == 0.1 and cfg.dpo.nll_weight == 0.2 and cfg.dpo.mask_formatting_tokens
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert DPOConfig.from_toml(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize("size", ["8b", "70b", "405b"])
def test_llama3_1_presets_carry_the_published_values(size: str, shared_data: Path) -> None:
    cfg = DPOConfig.from_toml(REPO_ROOT / f"configs/rlhf/dpo_llama3_1_{size}.toml")
    assert (cfg.model.name, cfg.optim.lr, cfg.dpo.template) == (f"llama3_1_{size}", 1e-5, "llama3_1")
    require_file(shared_data / "tokenizers/llama3/tokenizer.model")
    world = cfg.parallel.tp * 4
    cfg.replace(train={"steps": 1}).validate(world_size=world)  # files exist, the layout divides the batch


def test_refusals_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="dpo.label_smoothing=0.1 applies to dpo.loss=\"sigmoid\" only"):
        DPOConfig.from_toml(None, ["--dpo.loss=ipo", "--dpo.label_smoothing=0.1", "--dpo.files=README.md"]
                            )._validate_stage(world_size=1)
    # Pipeline parallelism is no longer refused (tests/distributed/test_rlhf_parity.py: dpo_pp2).
    DPOConfig.from_toml(None, ["--parallel.pp=2", "--dpo.files=README.md"])._validate_stage(world_size=2)
    with pytest.raises(ConfigError, match="dpo.files is empty"):
        DPOConfig.from_toml(None, [])._validate_stage(world_size=1)
    with pytest.raises(ConfigError, match="dpo.beta=0.0"):
        DPOConfig.from_toml(None, ["--dpo.beta=0", "--dpo.files=README.md"])._validate_stage(world_size=1)


def test_pair_encoding_and_batch_layout() -> None:
    """Answer masks cover the last assistant turn (and its end token); formatting tokens leave the DPO mask only;
    rows are chosen then rejected, shifted by one."""
    from rlhf.data import PreferencePair
    from rlhf.dpo.train import collate_dpo, encode_dpo_pair, formatting_ids
    from tests.unit.test_chat import ByteTokenizer

    class Tokenizer(ByteTokenizer):  # no <|eom_id|>: unknown pieces raise KeyError, as the real ones do
        def piece_to_id(self, piece: str) -> int:
            if len(piece) > 1 and piece not in self.SPECIALS:
                raise KeyError(piece)
            return super().piece_to_id(piece)

    tok = Tokenizer()
    pair = PreferencePair(prompt=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                  {"role": "user", "content": "2+2?"}], chosen="4", rejected="five",
                          rating=None, is_safety=False, source="t", id="0")
    item = encode_dpo_pair(tok, pair, template="llama3_1", max_len=512, stats=Counter())
    answer = [t for t, m in zip(item["chosen"], item["chosen_mask"]) if m]
    assert tok.decode(answer) == "4<|eot_id|>"
    assert tok.decode([t for t, m in zip(item["rejected"], item["rejected_mask"]) if m]) == "five<|eot_id|>"
    item["ref_logps"] = (-1.0, -2.0)
    fmt = formatting_ids(tok)
    assert tok.piece_to_id("<|eot_id|>") in fmt and tok.piece_to_id("<|start_header_id|>") in fmt
    batch = collate_dpo([item], formatting=fmt)
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] % 8 == 0
    assert batch["labels"][0, : len(item["chosen"]) - 1].tolist() == item["chosen"][1:]
    assert batch["loss_mask"][0].sum() == 2 and batch["dpo_mask"][0].sum() == 1  # "4" and eot; eot masked
    assert batch["ref_logps"].tolist() == [-1.0, -2.0]
    short = encode_dpo_pair(tok, pair, template="llama3_1", max_len=20, stats=(stats := Counter()))
    assert len(short["chosen"]) == 21 and short["chosen"][0] == tok.bos_id and stats["truncated_left"] == 2


@pytest.mark.parametrize("preset", sorted((REPO_ROOT / "configs/rlhf").glob("llama3_rounds_*.toml")),
                         ids=lambda p: p.name)
def test_rounds_presets_load(preset: Path) -> None:
    from rlhf.rounds import RoundsConfig

    cfg = RoundsConfig.from_toml(preset)
    assert cfg.rounds.count >= 2 and cfg.rounds.dpo_variants
    for name in ("sft_preset", "dpo_preset", "rm_preset"):
        assert (REPO_ROOT / getattr(cfg.rounds, name)).is_file(), name
    with pytest.raises(ConfigError, match="rounds.init_checkpoint is empty"):
        cfg.replace(rounds={"init_checkpoint": ""}).validate()


def test_rounds_expand_the_presets_data_dir_and_pass_the_weak_rm_gate(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """The tiny preset names its prompts ``{data_dir}/...``: the rejection-sampling and win-rate steps get real
    paths (the placeholder once reached rejection sampling verbatim), and ``rounds.allow_weak_rm`` reaches it."""
    from rlhf import rounds as rounds_mod

    monkeypatch.setenv("LLAMA_DATA_DIR", str(tmp_path))
    cfg = rounds_mod.RoundsConfig.from_toml(REPO_ROOT / "configs/rlhf/llama3_rounds_tiny.toml",
                                            ["--rounds.count=1", f"--rounds.dir={tmp_path / 'r'}",
                                             "--rounds.allow_weak_rm=true"])
    driver = rounds_mod.Rounds(cfg, log=lambda *a: None)
    assert driver.prompts == [str(tmp_path / "preferences/hh-rlhf/helpful-base/test.jsonl.gz")]
    commands: list[list[str]] = []

    def stop_after_first_step(name: str, command: list[str], run_dir: Path, **_: object) -> None:
        commands.append(command)
        raise StopIteration

    monkeypatch.setattr(rounds_mod, "run_step", stop_after_first_step)
    with pytest.raises(StopIteration):
        driver.run_round(1)
    (rs,) = commands
    assert rs[rs.index("--prompts") + 1] == driver.prompts[0] and "{data_dir}" not in " ".join(rs)
    assert "--allow-weak-rm" in rs
