"""Checkpoint converters without transformers: native, Meta shards, llama2.c, safe loading, atomic saves.

    pytest tests/unit/test_checkpoints.py
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from model.checkpoints import (
    UnsafeCheckpointError,
    detect_format,
    from_pretrained,
    load_checkpoint,
    safe_torch_load,
    save_checkpoint,
    streaming,
)
from model.checkpoints.hf import llama_config_from_hf
from model.checkpoints.llama2c import load_llama2c
from model.checkpoints.meta import config_from_params, load_meta, save_meta
from model.checkpoints.native import load_native, save_native
from model.config import LlamaConfig, RopeScaling, get_config
from model.llama import Llama, init_llama_weights
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(120)

LLAMA2_TINY = get_config("debug_llama2_tiny")
# Meta's params.json can only express Llama 3.1's own scaling constants (original context 8192).
LLAMA31_TINY = get_config("debug_llama3_tiny").replace(
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
)


def random_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A model whose every tensor (norms included) is random, so a misplaced tensor cannot go unnoticed."""
    model = Llama(cfg)
    init_llama_weights(model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def logits_of(model: Llama, seq: int = 40, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


# ---------------------------------------------------------------------------------------------------
# native
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [LLAMA2_TINY, LLAMA2_TINY.replace(tie_embeddings=True)], ids=["untied", "tied"])
def test_native_round_trip(tmp_path: Path, cfg: LlamaConfig) -> None:
    model = random_model(cfg)
    out = save_native(model, cfg, tmp_path / "ckpt")
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "llama-native" and meta["format_version"] == 1
    assert detect_format(out) == "native"
    loaded_cfg, state_dict = load_native(out)
    assert loaded_cfg == cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(state_dict[name], tensor), name
    reloaded = from_pretrained(out)
    assert not reloaded.training
    assert (reloaded.output.weight is reloaded.tok_embeddings.weight) == cfg.tie_embeddings
    assert torch.equal(logits_of(reloaded), logits_of(model))


def test_from_pretrained_dtype(tmp_path: Path) -> None:
    model = random_model(LLAMA2_TINY)
    save_checkpoint(model, LLAMA2_TINY, tmp_path / "ckpt")
    half = from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert (logits_of(half).float() - logits_of(model)).abs().max() < 0.1


def test_native_refuses_nonempty_dir_and_overwrites_atomically(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    first, second = random_model(LLAMA2_TINY, seed=1), random_model(LLAMA2_TINY, seed=2)
    save_native(first, LLAMA2_TINY, out)
    with pytest.raises(ValueError, match="not empty; pass overwrite=True"):
        save_native(second, LLAMA2_TINY, out)
    save_native(second, LLAMA2_TINY, out, overwrite=True)
    _, state_dict = load_native(out)
    assert torch.equal(state_dict["norm.weight"], second.norm.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp-/.old- leftovers


def test_failed_save_leaves_no_partial_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = streaming.HashingWriter.write

    def disk_full(self: streaming.HashingWriter, data: object) -> int:  # a few KB land, then "disk full"
        if self.size > 4096:
            raise OSError("No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(streaming.HashingWriter, "write", disk_full)
    model = random_model(LLAMA2_TINY)
    with pytest.raises(OSError, match="No space left"):
        save_native(model, LLAMA2_TINY, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    # Overwriting: the old checkpoint must survive a failed replacement untouched.
    monkeypatch.setattr(streaming.HashingWriter, "write", real_write)
    save_native(model, LLAMA2_TINY, tmp_path / "old")
    monkeypatch.setattr(streaming.HashingWriter, "write", disk_full)
    with pytest.raises(OSError):
        save_native(random_model(LLAMA2_TINY, seed=5), LLAMA2_TINY, tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    _, state_dict = load_native(tmp_path / "old")
    assert torch.equal(state_dict["norm.weight"], model.norm.weight)


def test_missing_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    model = random_model(LLAMA2_TINY)
    out = save_native(model, LLAMA2_TINY, tmp_path / "ckpt")
    weights = out / "model.safetensors"
    state_dict = safetensors.torch.load_file(weights)
    del state_dict["layers.1.feed_forward.w2.weight"]
    safetensors.torch.save_file(state_dict, weights)
    with pytest.raises(ValueError, match=r"model\.safetensors.*layers\.1\.feed_forward\.w2\.weight.*\[64, 192\]"):
        load_native(out)
    state_dict["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 100)
    safetensors.torch.save_file(state_dict, weights)
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w2\.weight.*\[64, 100\], expected \[64, 192\]"):
        load_native(out)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_checkpoint(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------------------------------
# safe loading
# ---------------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    payload = {"model.embed_tokens.weight": torch.zeros(2, 2), "evil": _Exploit(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*only those are allowed"):
        safe_torch_load(path)
    # Through a whole HF directory, too.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                      "num_attention_heads": 4, "num_hidden_layers": 1,
                                                      "intermediate_size": 96, "vocab_size": 2}))
    with pytest.raises(UnsafeCheckpointError, match="tensors and primitive containers"):
        load_checkpoint(tmp_path)
    assert not marker.exists(), "the pickle's payload ran"


# ---------------------------------------------------------------------------------------------------
# Meta
# ---------------------------------------------------------------------------------------------------
def to_adjacent_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split rows -> Meta's adjacent pairs, written independently of the converter: per head,
    row i of the first half and row i of the second half become rows 2i and 2i+1."""
    rows, cols = w.shape
    heads = w.reshape(n_heads, rows // n_heads, cols)
    first, second = heads.chunk(2, dim=1)
    return torch.stack((first, second), dim=2).reshape(rows, cols)


def write_meta_checkpoint(model: Llama, out: Path, *, shards: int, vocab_parallel: bool) -> None:
    cfg = model.config
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, tensor in model.state_dict().items():
        if name.endswith("attention.wq.weight"):
            tensor = to_adjacent_pairs(tensor, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = to_adjacent_pairs(tensor, cfg.kv_heads)
        if tensor.ndim == 1:
            pieces = [tensor] * shards  # norms are replicated on every rank
        elif name == "tok_embeddings.weight":
            pieces = tensor.chunk(shards, dim=0 if vocab_parallel else 1)
        elif name.endswith(("wo.weight", "w2.weight")):
            pieces = tensor.chunk(shards, dim=1)
        else:
            pieces = tensor.chunk(shards, dim=0)
        for part, piece in zip(parts, pieces, strict=True):
            part[name] = piece.clone()
    out.mkdir()
    for rank, part in enumerate(parts):
        if not vocab_parallel:
            part["rope.freqs"] = torch.randn(128, cfg.head_dim // 2)  # Llama 1/2 files carry this buffer
        torch.save(part, out / f"consolidated.{rank:02d}.pth")
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": cfg.multiple_of,
              "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}
    if vocab_parallel:  # Llama 3.1 style
        params.update(n_kv_heads=cfg.kv_heads, vocab_size=cfg.vocab_size, use_scaled_rope=True)
    else:  # Llama 2 style: vocabulary comes from the embedding
        params.update(vocab_size=-1)
    (out / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize(
    ("cfg", "vocab_parallel"), [(LLAMA2_TINY, False), (LLAMA31_TINY, True)], ids=["llama2", "llama3.1"]
)
def test_meta_sharded_round_trip(tmp_path: Path, cfg: LlamaConfig, vocab_parallel: bool) -> None:
    model = random_model(cfg, seed=3)
    write_meta_checkpoint(model, tmp_path / "meta", shards=2, vocab_parallel=vocab_parallel)
    assert detect_format(tmp_path / "meta") == "meta"
    loaded_cfg, _ = load_meta(tmp_path / "meta", max_seq_len=cfg.max_seq_len)
    assert loaded_cfg.replace(name=cfg.name) == cfg
    reloaded = from_pretrained(tmp_path / "meta")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert (logits_of(reloaded) - logits_of(model)).abs().max() == 0

    # Export (single shard) and import again.
    save_meta(model.state_dict(), cfg, tmp_path / "exported")
    _, state_dict = load_meta(tmp_path / "exported")
    assert all(torch.equal(state_dict[n], t) for n, t in model.state_dict().items())


def test_meta_llama3_8b_params(shared_data: Path) -> None:
    path = require_file(shared_data / "tokenizers" / "llama3" / "params.json.Meta-Llama-3-8B")
    cfg = config_from_params(json.loads(path.read_text()), source=path)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads) == (4096, 32, 32, 8)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.ffn_dim, cfg.norm_eps) == (128256, 500000.0, 14336, 1e-5)
    assert cfg.rope_scaling is None and cfg.max_seq_len == 8192
    scaled = config_from_params({**json.loads(path.read_text()), "use_scaled_rope": True})
    assert scaled.rope_scaling == get_config("llama3_1_8b").rope_scaling and scaled.max_seq_len == 131072
    with pytest.raises(ValueError, match="moe_experts"):
        config_from_params({**json.loads(path.read_text()), "moe_experts": 16}, source=path)


# ---------------------------------------------------------------------------------------------------
# llama2.c
# ---------------------------------------------------------------------------------------------------
def test_truncated_llama2c_is_refused_with_sizes(tmp_path: Path, shared_data: Path) -> None:
    source = require_file(shared_data / "checkpoints" / "stories260K" / "stories260K.bin")
    data = source.read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=rf"truncated\.bin: file size is {len(data) - 1000} bytes .* {len(data)} bytes"):
        load_llama2c(truncated)
    with pytest.raises(ValueError, match="not a recognised checkpoint file"):
        detect_format(truncated)


def write_llama2c_v1(model: Llama, path: Path) -> None:
    """llama2.c ``export.py --version 1`` layout (adjacent-pair q/k, norms first, shared-classifier flag)."""
    cfg, sd = model.config, model.state_dict()
    layers = range(cfg.n_layers)
    shared = cfg.tie_embeddings
    header = struct.pack("<Ii7iB", 0x616B3432, 1, cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads,
                         cfg.vocab_size, cfg.max_seq_len, int(shared))
    tensors = [sd[f"layers.{i}.attention_norm.weight"] for i in layers]
    tensors += [sd[f"layers.{i}.ffn_norm.weight"] for i in layers] + [sd["norm.weight"], sd["tok_embeddings.weight"]]
    tensors += [to_adjacent_pairs(sd[f"layers.{i}.attention.wq.weight"], cfg.n_heads) for i in layers]
    tensors += [to_adjacent_pairs(sd[f"layers.{i}.attention.wk.weight"], cfg.kv_heads) for i in layers]
    for name in ("attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        tensors += [sd[f"layers.{i}.{name}.weight"] for i in layers]
    if not shared:
        tensors.append(sd["output.weight"])
    body = b"".join(t.contiguous().numpy().astype("<f4").tobytes() for t in tensors)
    path.write_bytes(header + b"\0" * (256 - len(header)) + body)


@pytest.mark.parametrize("tied", [True, False])
def test_llama2c_v1(tmp_path: Path, tied: bool) -> None:
    cfg = get_config("debug_tiny").replace(tie_embeddings=tied, ffn_hidden_dim=100)
    model = random_model(cfg, seed=4)
    write_llama2c_v1(model, tmp_path / "model.bin")
    assert detect_format(tmp_path / "model.bin") == "llama2c"
    reloaded = from_pretrained(tmp_path / "model.bin")
    assert reloaded.config.replace(name=cfg.name, multiple_of=cfg.multiple_of) == cfg
    assert torch.equal(logits_of(reloaded), logits_of(model))


# ---------------------------------------------------------------------------------------------------
# HF config translation (no transformers needed)
# ---------------------------------------------------------------------------------------------------
HF_BASE = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 512, "rms_norm_eps": 1e-5}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_hf_config_rejects_unsupported(change: dict, message: str) -> None:
    data = {k: v for k, v in {**HF_BASE, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        llama_config_from_hf(data, source="some/config.json")


def test_hf_config_reads_both_rope_spellings() -> None:
    legacy = {**HF_BASE, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}
    v5 = {**HF_BASE, "rope_parameters": {**legacy["rope_scaling"], "rope_theta": 500000.0}}
    assert llama_config_from_hf(legacy) == llama_config_from_hf(v5)
    cfg = llama_config_from_hf(v5)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.original_max_position == 64
    assert llama_config_from_hf({**HF_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
                                ).rope_theta == 1e6
