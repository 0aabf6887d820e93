"""Hugging Face ``LlamaForCausalLM`` checkpoints: config translation, renaming, sharded safetensors.

    from model.checkpoints.hf import save_hf, load_hf
    save_hf(state_dict, cfg, "out/hf")            # then transformers.LlamaForCausalLM.from_pretrained("out/hf")
    write_hf(reader, cfg, "out/hf", max_shard_bytes="5GB")   # streamed from any TensorSource, sharded + index
    cfg, state_dict = load_hf("path/or/org/repo")  # hub ids go through huggingface_hub.snapshot_download

Our RoPE layout *is* HF's (half-split, see ``model/llama.py``), so weights convert by renaming alone:
``tok_embeddings`` <-> ``model.embed_tokens``, ``attention.w{q,k,v,o}`` <-> ``self_attn.{q,k,v,o}_proj``,
``feed_forward.w{1,3,2}`` <-> ``mlp.{gate,up,down}_proj``, ``attention_norm`` <-> ``input_layernorm``,
``ffn_norm`` <-> ``post_attention_layernorm``, ``norm`` <-> ``model.norm``, ``output`` <-> ``lm_head``.

Config compatibility: transformers 4.4x reads ``rope_theta`` and ``rope_scaling``; 5.x reads
``rope_parameters`` but still takes a ``rope_scaling`` key in config.json *in preference to*
``rope_parameters`` (and fills ``rope_theta`` from the top-level key). We therefore write all three,
consistently, and read either spelling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoints.common import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    MemoryReader,
    StateDict,
    TensorSource,
    atomic_directory,
    check_state_dict,
    load_safetensors,
    read_json,
    tie_output,
    write_json,
)
from model.checkpoints.safe_load import safe_torch_load
from model.checkpoints.streaming import SAFE_INDEX, TensorSpec, parse_size, write_sharded_safetensors
from model.config import LlamaConfig, RopeScaling

BIN_INDEX = "pytorch_model.bin.index.json"

_LAYER_RENAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_RENAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
# Buffers some older HF checkpoints saved; they are recomputed from the config.
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------
def hf_name(name: str) -> str:
    """Our parameter name -> the HF ``LlamaForCausalLM`` name."""
    if name in _GLOBAL_RENAMES:
        return _GLOBAL_RENAMES[name]
    match = _LAYER_NAME.match(name)
    if match and match.group(2) in _LAYER_RENAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_RENAMES[match.group(2)]}.weight"
    raise ValueError(f"tensor {name!r} has no Hugging Face Llama equivalent")


_REVERSE_LAYER = {v: k for k, v in _LAYER_RENAMES.items()}
_REVERSE_GLOBAL = {v: k for k, v in _GLOBAL_RENAMES.items()}


def native_name(name: str, *, source: str | Path = "state dict") -> str:
    """HF ``LlamaForCausalLM`` name -> ours; unknown names raise ValueError naming ``source``."""
    if name in _REVERSE_GLOBAL:
        return _REVERSE_GLOBAL[name]
    match = _HF_LAYER_NAME.match(name)
    if match and match.group(2) in _REVERSE_LAYER:
        return f"layers.{match.group(1)}.{_REVERSE_LAYER[match.group(2)]}.weight"
    raise ValueError(
        f"{source}: unexpected tensor {name!r}: not a LlamaForCausalLM weight (biases, adapters and other "
        "architectures are not supported)"
    )


def to_hf_state_dict(state_dict: Mapping[str, Tensor], cfg: LlamaConfig) -> StateDict:
    """Rename to HF; with tied embeddings ``lm_head.weight`` is left out, as ``save_pretrained`` does."""
    return {hf_name(n): t for n, t in state_dict.items() if not (cfg.tie_embeddings and n == "output.weight")}


def from_hf_state_dict(state_dict: Mapping[str, Tensor], *, source: str | Path = "state dict") -> StateDict:
    return {native_name(n, source=source): t for n, t in state_dict.items() if not _IGNORED_HF.search(n)}


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
def _default_special_ids(cfg: LlamaConfig) -> tuple[int, int]:
    # Llama 3 tiktoken vocabulary: <|begin_of_text|>, <|end_of_text|>; SentencePiece Llamas: <s>=1, </s>=2.
    return (128000, 128001) if cfg.vocab_size == 128256 else (1, 2)


def hf_config_from_llama(
    cfg: LlamaConfig,
    *,
    torch_dtype: str | torch.dtype = "float32",
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``LlamaForCausalLM``, readable by transformers 4.4x and 5.x."""
    default_bos, default_eos = _default_special_ids(cfg)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling.factor,
            "low_freq_factor": cfg.rope_scaling.low_freq_factor,
            "high_freq_factor": cfg.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": cfg.rope_scaling.original_max_position,
        }
    rope_parameters = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "torch_dtype": dtype_name,  # transformers 4.x
        "dtype": dtype_name,  # transformers 5.x
        "bos_token_id": default_bos if bos_token_id is None else bos_token_id,
        "eos_token_id": default_eos if eos_token_id is None else eos_token_id,
        "use_cache": True,
    }


def _hf_rope(data: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """``(theta, scaling)`` from either spelling; like transformers 5.x, ``rope_scaling`` wins if set."""
    params = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: \"rope_scaling\"/\"rope_parameters\" must be an object, got {params!r}")
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"{where}: rope_scaling.rope_type={rope_type!r} is not supported; only \"default\" and \"llama3\" "
            "(Llama 3.1) RoPE exist in this model"
        )
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    except KeyError as err:
        raise ValueError(f"{where}: llama3 rope_scaling is missing the field {err.args[0]!r}") from None
    return theta, scaling


def llama_config_from_hf(data: Mapping[str, Any], *, source: str | Path = "config.json") -> LlamaConfig:
    """Translate an HF Llama config dict; anything our network cannot represent is a ValueError naming it."""
    where = str(source)
    if data.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type={data.get('model_type')!r}; only \"llama\" checkpoints convert")
    for flag in ("attention_bias", "mlp_bias"):
        if data.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported: this Llama has no biases")
    if data.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={data['hidden_act']!r} is not supported; Llama uses \"silu\"")
    try:
        dim, n_heads = int(data["hidden_size"]), int(data["num_attention_heads"])
        head_dim = data.get("head_dim")
        if head_dim is not None and dim % n_heads == 0 and int(head_dim) != dim // n_heads:
            raise ValueError(
                f"{where}: head_dim={head_dim} differs from hidden_size/num_attention_heads={dim // n_heads}; "
                "decoupled head sizes are not supported"
            )
        theta, scaling = _hf_rope(data, where)
        n_kv = data.get("num_key_value_heads")
        cfg = LlamaConfig(
            name=str(data.get("_name_or_path") or Path(where).parent.name or "hf"),
            dim=dim,
            n_layers=int(data["num_hidden_layers"]),
            n_heads=n_heads,
            # MHA is spelled n_kv_heads=None in our registry; keep equal configs equal.
            n_kv_heads=None if n_kv is None or int(n_kv) == n_heads else int(n_kv),
            vocab_size=int(data["vocab_size"]),
            ffn_hidden_dim=int(data["intermediate_size"]),
            norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(data.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ValueError(f"{where}: required field {err.args[0]!r} is missing") from None
    try:
        return cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


# ---------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------
def save_hf(
    state_dict: Mapping[str, Tensor],
    cfg: LlamaConfig,
    out_dir: str | Path,
    *,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> Path:
    """Write an HF checkpoint directory (atomically): config.json + safetensors, sharded above the limit."""
    state_dict = dict(state_dict)
    check_state_dict(state_dict, cfg, source="save_hf(state_dict)")
    return write_hf(MemoryReader(cfg, state_dict, source="save_hf(state_dict)"), cfg, out_dir,
                    max_shard_bytes=max_shard_bytes, overwrite=overwrite, bos_token_id=bos_token_id,
                    eos_token_id=eos_token_id)


def write_hf(
    source: TensorSource,
    cfg: LlamaConfig,
    out_dir: str | Path,
    *,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> Path:
    """Stream ``source`` into an HF directory: ``model-0000i-of-0000n.safetensors`` + the index above
    ``max_shard_bytes`` ("5GB" = 5e9 bytes, as ``save_pretrained``), with one tensor in memory at a time."""
    ours = {hf_name(s.name): s for s in source.specs() if not (cfg.tie_embeddings and s.name == "output.weight")}
    specs = [TensorSpec(name, s.shape, dtype or s.dtype) for name, s in ours.items()]
    hf_config = hf_config_from_llama(cfg, torch_dtype=specs[0].dtype, bos_token_id=bos_token_id,
                                     eos_token_id=eos_token_id)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_json(tmp / CONFIG_NAME, hf_config)
        write_sharded_safetensors(tmp, specs, lambda name: source.read(ours[name].name),
                                  max_shard_bytes=parse_size(max_shard_bytes))
    return out_dir


def _resolve(path_or_repo: str | Path) -> Path:
    """A local directory, or a hub repo id fetched with ``huggingface_hub`` (only if installed)."""
    path = Path(path_or_repo)
    if path.exists():
        return path
    if isinstance(path_or_repo, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_repo):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise FileNotFoundError(
                f"{path_or_repo}: no such directory, and huggingface_hub is not installed to fetch it as a hub "
                "repo id (pip install huggingface_hub)"
            ) from None
        try:
            return Path(snapshot_download(
                path_or_repo, allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"]
            ))
        except Exception as err:  # offline, gated, not found: one clear message
            raise FileNotFoundError(
                f"{path_or_repo}: no such local directory, and downloading it from the Hugging Face hub failed "
                f"({type(err).__name__}: {err}); download it yourself and pass the local directory"
            ) from err
    raise FileNotFoundError(f"{path_or_repo}: no such checkpoint directory")


def _read_hf_weights(ckpt_dir: Path) -> tuple[StateDict, Path]:
    """All tensors (HF names) from single-file or sharded safetensors, else pytorch_model*.bin."""
    for index_name, loader in ((SAFE_INDEX, load_safetensors), (BIN_INDEX, safe_torch_load)):
        index_path = ckpt_dir / index_name
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path}: \"weight_map\" is missing or empty")
            tensors: StateDict = {}
            for file_name in sorted(set(weight_map.values())):
                shard = loader(ckpt_dir / file_name)
                if not isinstance(shard, dict):
                    raise ValueError(f"{ckpt_dir / file_name}: expected a dict of tensors")
                tensors.update(shard)
            return tensors, index_path
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        path = ckpt_dir / file_name
        if path.is_file():
            tensors = load_safetensors(path) if path.suffix == ".safetensors" else safe_torch_load(path)
            if not isinstance(tensors, dict):
                raise ValueError(f"{path}: expected a dict of tensors, found {type(tensors).__name__}")
            return tensors, path
    raise FileNotFoundError(
        f"{ckpt_dir}: no weights found (looked for {SAFE_INDEX}, model.safetensors, {BIN_INDEX}, "
        "pytorch_model.bin)"
    )


def load_hf(path_or_repo: str | Path) -> tuple[LlamaConfig, StateDict]:
    """Read an HF Llama checkpoint into ``(config, state_dict)`` under our names; tensors keep their dtype."""
    ckpt_dir = _resolve(path_or_repo)
    config_path = ckpt_dir / CONFIG_NAME
    cfg = llama_config_from_hf(read_json(config_path), source=config_path)
    hf_tensors, weights_path = _read_hf_weights(ckpt_dir)
    state_dict = from_hf_state_dict(hf_tensors, source=weights_path)
    if cfg.tie_embeddings:
        state_dict.pop("output.weight", None)  # some exports store the tied head too; the embedding rules
        tie_output(state_dict, cfg)
    check_state_dict(state_dict, cfg, source=weights_path)
    return cfg, state_dict


def is_hf_dir(path: Path) -> bool:
    config = path / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)
