"""Parity with transformers' ``LlamaForCausalLM`` through the real converters (fp32, CPU).

    pytest tests/parity/test_hf_parity.py

Ours -> ``save_hf`` -> ``LlamaForCausalLM.from_pretrained`` and HF ``save_pretrained`` -> ``load_hf`` -> ours
must give the same logits (max |diff| <= 1e-4), for a Llama 2-style MHA model and a Llama 3.1-style GQA
model with RoPE scaling evaluated far beyond its original context. HF -> native -> HF is bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from model.checkpoints import detect_format, from_pretrained, load_checkpoint, save_checkpoint
from model.checkpoints.hf import hf_config_from_llama, load_hf, save_hf
from model.config import LlamaConfig, get_config
from tests.unit.test_checkpoints import random_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(120)

TOL = 1e-4
CONFIGS = {
    "llama2_mha": (get_config("debug_llama2_tiny"), 128),
    # original_max_position 64, evaluated at 300 positions: the scaled frequencies matter.
    "llama3_1_gqa_scaled": (get_config("debug_llama3_tiny"), 300),
}


def tokens_for(cfg: LlamaConfig, seq: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(7))


def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=tokens).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_to_hf(tmp_path: Path, name: str) -> None:
    cfg, seq = CONFIGS[name]
    model = random_model(cfg, seed=11)
    save_hf(model.state_dict(), cfg, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    if cfg.rope_scaling is not None:
        rope = hf_model.config.rope_parameters if hasattr(hf_model.config, "rope_parameters") else \
            hf_model.config.rope_scaling
        assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == 64
    tokens = tokens_for(cfg, seq)
    with torch.no_grad():
        ours = model(tokens)
    diff = (hf_logits(hf_model, tokens) - ours).abs().max().item()
    print(f"{name}: ours -> HF max |logit diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_ours(tmp_path: Path, name: str) -> None:
    cfg, seq = CONFIGS[name]
    ignored = ("architectures", "model_type", "dtype", "torch_dtype")
    hf_config = transformers.LlamaConfig(**{k: v for k, v in hf_config_from_llama(cfg).items() if k not in ignored})
    torch.manual_seed(5)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF initialises norms to ones; randomise them so a swapped norm shows up
        for param_name, param in hf_model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn_like(param))
    hf_model.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    ours = from_pretrained(tmp_path / "hf")
    assert ours.config.replace(name=cfg.name, ffn_hidden_dim=None, multiple_of=cfg.multiple_of) == cfg
    tokens = tokens_for(cfg, seq)
    with torch.no_grad():
        diff = (hf_logits(hf_model, tokens) - ours(tokens)).abs().max().item()
    print(f"{name}: HF -> ours max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_hf_native_hf_bit_identical(tmp_path: Path) -> None:
    cfg = get_config("debug_tiny")
    hf_config = transformers.LlamaConfig(hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                         num_key_value_heads=cfg.kv_heads, vocab_size=cfg.vocab_size,
                                         max_position_embeddings=cfg.max_seq_len)
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    loaded_cfg, state_dict = load_checkpoint(tmp_path / "hf")
    save_checkpoint(state_dict, loaded_cfg, tmp_path / "native", format="native")
    native_cfg, native_sd = load_checkpoint(tmp_path / "native")
    assert native_cfg == loaded_cfg
    # Small shards force the index path on the way out.
    save_hf(native_sd, native_cfg, tmp_path / "hf2", max_shard_bytes=40_000)
    assert (tmp_path / "hf2" / "model.safetensors.index.json").is_file()
    original = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    index = json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = {}
    for file_name in sorted(set(index["weight_map"].values())):
        again.update(safetensors.torch.load_file(tmp_path / "hf2" / file_name))
    assert sorted(again) == sorted(original)
    for name, tensor in original.items():
        assert again[name].dtype == torch.bfloat16 and torch.equal(again[name], tensor), name
    # And transformers reads the sharded copy.
    reread = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2")
    assert torch.equal(reread.model.embed_tokens.weight, original["model.embed_tokens.weight"])


def test_pytorch_model_bin_and_tied(tmp_path: Path) -> None:
    cfg = get_config("debug_tiny").replace(tie_embeddings=True)
    model = random_model(cfg, seed=2)
    save_hf(model.state_dict(), cfg, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    # The legacy pickle format (what save_pretrained(safe_serialization=False) wrote in transformers 4.x).
    (tmp_path / "bin").mkdir()
    torch.save({k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"},
               tmp_path / "bin" / "pytorch_model.bin")
    hf_model.config.to_json_file(tmp_path / "bin" / "config.json")
    loaded_cfg, state_dict = load_hf(tmp_path / "bin")
    assert loaded_cfg.tie_embeddings and state_dict["output.weight"] is state_dict["tok_embeddings.weight"]
    ours = from_pretrained(tmp_path / "bin")
    tokens = tokens_for(cfg, 50)
    with torch.no_grad():
        diff = (hf_logits(hf_model, tokens) - ours(tokens)).abs().max().item()
    assert diff <= TOL

    # Sharded pickles with pytorch_model.bin.index.json (older hub uploads).
    (tmp_path / "bin" / "pytorch_model.bin").unlink()
    tensors = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        file_name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, tmp_path / "bin" / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, sharded = load_hf(tmp_path / "bin")
    assert all(torch.equal(sharded[n], t) for n, t in state_dict.items())



def test_hub_id_without_network_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time, so patch it too
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        load_checkpoint("no-such-org/no-such-model")
