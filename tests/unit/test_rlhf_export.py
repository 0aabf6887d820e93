"""The one policy export (``rlhf.export`` over ``train.task.export_final``): native weights with a tied head stored
once, re-tied on load, and ``rlhf.json`` beside them (tokenizer made absolute, template, stage, max_len)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from model.checkpoints import from_pretrained
from model.config import get_config
from model.llama import Llama
from rlhf.export import SIDECAR, export_policy, policy_meta, read_sidecar


class OneProcessEngine:
    """An engine without ``exported_weights``: ``train.task.exported_weights`` falls back to its state dict."""

    def __init__(self, model: Llama) -> None:
        self.model = model

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())


def test_tied_head_stored_once_and_sidecar_written(tmp_path: Path) -> None:
    cfg = get_config("debug_tiny").replace(tie_embeddings=True)
    torch.manual_seed(0)
    model = Llama(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"x")
    meta = policy_meta(stage="ppo", tokenizer=str(tok), template="llama2", max_len=64)
    out = export_policy(OneProcessEngine(model), cfg, tmp_path / "final_policy", rank=0, meta=meta)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "output.weight" not in f.keys() and "tok_embeddings.weight" in f.keys()
    loaded = from_pretrained(out)
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    torch.testing.assert_close(loaded(ids), model(ids))
    side = json.loads((out / SIDECAR).read_text())
    assert side == read_sidecar(out) and side["stage"] == "ppo" and side["template"] == "llama2"
    assert Path(side["tokenizer"]).is_absolute() and side["max_len"] == 64
    assert read_sidecar(tmp_path) == side  # tmp_path is laid out as a PPO run directory: its exported policy
    (tmp_path / "other").mkdir()
    assert read_sidecar(tmp_path / "other") == {}


def test_gatt_and_ppo_take_the_shape_from_their_init_checkpoint(tmp_path: Path) -> None:
    """No --model.overrides.* flags: the init checkpoint's config.json holds the shape (issue 23 item 2)."""
    from model.checkpoints.native import save_native
    from rlhf.gatt.task import GAttConfig
    from rlhf.ppo.config import PPOConfig

    cfg = get_config("debug_tiny").replace(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=300)
    save_native(Llama(cfg), cfg, tmp_path / "policy")
    gatt = GAttConfig.from_toml("configs/rlhf/gatt_tiny.toml", [f"--gatt.init={tmp_path / 'policy'}"])
    ppo = PPOConfig.from_toml("configs/rlhf/ppo_tiny.toml", [f"--ppo.init={tmp_path / 'policy'}"])
    assert gatt.model_config() == cfg and ppo.model_config() == cfg
    longer = GAttConfig.from_toml(None, [f"--gatt.init={tmp_path / 'policy'}", "--model.overrides.max_seq_len=64"])
    assert longer.model_config() == cfg.replace(max_seq_len=64)
    import pytest

    from train.config_reader import ConfigError

    with pytest.raises(ConfigError, match=r"gatt.init .*nope: no such file or directory"):
        GAttConfig.from_toml(None, [f"--gatt.init={tmp_path / 'nope'}"]).model_config()
