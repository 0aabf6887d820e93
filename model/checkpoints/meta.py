"""Meta's reference checkpoints (``consolidated.NN.pth`` + ``params.json``), Llama 1, 2, 3 and 3.1.

    from model.checkpoints.meta import load_meta, config_from_params
    cfg, state_dict = load_meta("Meta-Llama-3.1-8B/")   # merges model-parallel shards, permutes q/k

Meta's tensor names are ours. Two things differ:
1. Model-parallel shards (one file per GPU of the original run) are merged exactly as Meta's
   ``ColumnParallelLinear``/``RowParallelLinear`` split them: wq/wk/wv/w1/w3/output along dim 0, wo/w2
   along dim 1, norms replicated. The embedding is split along the *embedding* dim (dim 1) in Llama 1/2
   (``ParallelEmbedding``) but along the *vocabulary* (dim 0) in Llama 3 (``VocabParallelEmbedding``);
   which one is told by the shard shapes, not the version.
2. Meta rotates *adjacent* pairs (2i, 2i+1); we rotate i with i + head_dim/2 (HF layout). Reordering the
   output rows of wq and wk within each head (HF's ``permute`` in ``convert_llama_weights_to_hf.py``)
   makes the two computations identical; ``unpermute_rope`` is its inverse, used for export.

``params.json`` carries no context length (Meta passes ``max_seq_len`` at build time) and Llama 1/2 files
say ``vocab_size: -1``: the vocabulary comes from the embedding shape, and the context length defaults to
the published one (2048 Llama 1, 4096 Llama 2, 8192 Llama 3, 131072 Llama 3.1) unless given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoints.native import StateDict, atomic_directory, check_state_dict, read_json, write_json
from model.checkpoints.safe_load import safe_torch_load
from model.config import LlamaConfig, RopeScaling

PARAMS_NAME = "params.json"
_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
# Split along the output features (ColumnParallelLinear) / input features (RowParallelLinear).
_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
           "feed_forward.w3.weight", "output.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")
_IGNORED = ("rope.freqs",)  # Llama 1/2 saved the complex RoPE table; recomputed from the config


# ---------------------------------------------------------------------------------------------------
# RoPE layout
# ---------------------------------------------------------------------------------------------------
def permute_rope(w: Tensor, n_heads: int) -> Tensor:
    """Adjacent-pair rows (Meta, llama2.c) -> half-split rows (ours, HF), per head. ``w: [out, in]``."""
    out_features, in_features = w.shape
    return w.view(n_heads, out_features // n_heads // 2, 2, in_features).transpose(1, 2).reshape(
        out_features, in_features
    )


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of ``permute_rope``: half-split rows -> adjacent-pair rows."""
    out_features, in_features = w.shape
    return w.view(n_heads, 2, out_features // n_heads // 2, in_features).transpose(1, 2).reshape(
        out_features, in_features
    )


# ---------------------------------------------------------------------------------------------------
# params.json
# ---------------------------------------------------------------------------------------------------
def _default_context(params: Mapping[str, Any]) -> int:
    if params.get("use_scaled_rope"):
        return 131072
    if float(params.get("rope_theta", 10000.0)) >= 500000.0:
        return 8192
    return 2048 if float(params.get("norm_eps", 1e-5)) == 1e-6 else 4096


def config_from_params(
    params: Mapping[str, Any],
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    source: str | Path = PARAMS_NAME,
) -> LlamaConfig:
    """``params.json`` -> LlamaConfig. ``vocab_size`` fills in Llama 1/2's ``-1`` (from the embedding)."""
    where = str(source)
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len",
             "max_batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{where}: unsupported params.json field(s) {unknown}; supported: {sorted(known)}")
    try:
        vocab = int(params.get("vocab_size", -1))
        if vocab <= 0:
            if vocab_size is None:
                raise ValueError(f"{where}: vocab_size is {vocab}; pass the vocabulary size (embedding rows)")
            vocab = vocab_size
        scaling = None
        if params.get("use_scaled_rope"):
            # Meta's apply_scaling hard-codes low 1, high 4, original 8192; Llama 3.2 adds the factor.
            scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or 8.0), low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position=8192)
        multiplier = params.get("ffn_dim_multiplier")
        cfg = LlamaConfig(
            name="meta",
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=None if params.get("n_kv_heads") in (None, params["n_heads"]) else int(params["n_kv_heads"]),
            vocab_size=vocab,
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=None if multiplier is None else float(multiplier),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(max_seq_len or params.get("max_seq_len") or _default_context(params)),
        )
        return cfg.validate()
    except KeyError as err:
        raise ValueError(f"{where}: required field {err.args[0]!r} is missing") from None
    except (TypeError, ValueError) as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {err}") from None


def params_from_config(cfg: LlamaConfig) -> dict[str, Any]:
    """The ``params.json`` Meta's code would need to rebuild ``cfg`` (export)."""
    if cfg.rope_scaling is not None and (cfg.rope_scaling.low_freq_factor, cfg.rope_scaling.high_freq_factor,
                                         cfg.rope_scaling.original_max_position) != (1.0, 4.0, 8192):
        raise ValueError(f"config {cfg.name!r}: Meta's params.json can only express Llama 3.1's RoPE scaling "
                         "(low_freq_factor 1, high_freq_factor 4, original 8192)")
    if cfg.ffn_hidden_dim is not None and cfg.ffn_hidden_dim != LlamaConfig(
            dim=cfg.dim, multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier).ffn_dim:
        raise ValueError(f"config {cfg.name!r}: ffn_hidden_dim={cfg.ffn_hidden_dim} cannot be expressed with "
                         "multiple_of / ffn_dim_multiplier in params.json")
    params: dict[str, Any] = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                              "n_kv_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size,
                              "multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
                              "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                              "max_seq_len": cfg.max_seq_len}
    if cfg.rope_scaling is not None:
        params.update(use_scaled_rope=True, rope_scaling_factor=cfg.rope_scaling.factor)
    return params


# ---------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------
def shard_files(ckpt_dir: Path) -> list[Path]:
    """``consolidated.00.pth, consolidated.01.pth, ...`` in rank order; gaps are an error."""
    found = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _SHARD.match(p.name)))
    if not found:
        raise FileNotFoundError(f"{ckpt_dir}: no consolidated.NN.pth files (not a Meta checkpoint)")
    ranks = [rank for rank, _ in found]
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{ckpt_dir}: model-parallel shards are incomplete: found ranks {ranks}")
    return [p for _, p in found]


def _merge_dim(name: str, shards: list[Tensor], *, dim: int) -> int | None:
    """Concatenation dim for one tensor, ``None`` for replicated ones."""
    if len(shards) == 1 or shards[0].ndim == 1:
        return None
    if name == "tok_embeddings.weight":
        # ParallelEmbedding (Llama 1/2) holds dim/N columns; VocabParallelEmbedding (Llama 3) all columns.
        return 0 if shards[0].shape[1] == dim else 1
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    raise ValueError(f"tensor {name!r} is not a Llama weight; cannot merge its model-parallel shards")


def merge_shards(shards: list[Mapping[str, Tensor]], *, dim: int, files: list[Path]) -> StateDict:
    """Concatenate model-parallel shards into full tensors (see the module docstring)."""
    merged: StateDict = {}
    for name in shards[0]:
        if name in _IGNORED:
            continue
        parts = []
        for shard, path in zip(shards, files, strict=True):
            if name not in shard:
                raise ValueError(f"{path}: tensor {name!r} is missing (present in {files[0].name})")
            parts.append(shard[name])
        axis = _merge_dim(name, parts, dim=dim)
        merged[name] = parts[0] if axis is None else torch.cat(parts, dim=axis)
    return merged


def load_meta(
    ckpt_dir: str | Path, *, max_seq_len: int | None = None
) -> tuple[LlamaConfig, StateDict]:
    """Read a Meta checkpoint directory into ``(config, state_dict)`` in our (half-split) layout."""
    ckpt_dir = Path(ckpt_dir)
    params_path = ckpt_dir / PARAMS_NAME
    params = read_json(params_path)
    files = shard_files(ckpt_dir)
    shards = []
    for path in files:
        shard = safe_torch_load(path)
        if not isinstance(shard, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(shard).__name__}")
        shards.append(shard)
    if "dim" not in params:
        raise ValueError(f"{params_path}: required field 'dim' is missing")
    state_dict = merge_shards(shards, dim=int(params["dim"]), files=files)
    embedding = state_dict.get("tok_embeddings.weight")
    cfg = config_from_params(params, vocab_size=None if embedding is None else embedding.shape[0],
                             max_seq_len=max_seq_len, source=params_path)
    if "output.weight" not in state_dict and embedding is not None:
        cfg = cfg.replace(tie_embeddings=True)  # Llama 3.2 1B/3B style: head tied to the embedding
        state_dict["output.weight"] = embedding
    source = files[0] if len(files) == 1 else f"{ckpt_dir}/consolidated.*.pth"
    check_state_dict(state_dict, cfg, source=source)
    for i in range(cfg.n_layers):
        prefix = f"layers.{i}.attention."
        state_dict[prefix + "wq.weight"] = permute_rope(state_dict[prefix + "wq.weight"], cfg.n_heads)
        state_dict[prefix + "wk.weight"] = permute_rope(state_dict[prefix + "wk.weight"], cfg.kv_heads)
    return cfg, state_dict


def save_meta(state_dict: Mapping[str, Tensor], cfg: LlamaConfig, out_dir: str | Path, *,
              overwrite: bool = False) -> Path:
    """Export as a single-shard Meta checkpoint (``consolidated.00.pth`` + ``params.json``), atomically."""
    params = params_from_config(cfg)
    check_state_dict(state_dict, cfg, source="save_meta(state_dict)")
    out: StateDict = {}
    for name, tensor in state_dict.items():
        if name.endswith("attention.wq.weight"):
            tensor = unpermute_rope(tensor, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = unpermute_rope(tensor, cfg.kv_heads)
        out[name] = tensor.detach().to("cpu").contiguous().clone()
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_json(tmp / PARAMS_NAME, params)
        torch.save(out, tmp / "consolidated.00.pth")
    return out_dir


def is_meta_dir(path: Path) -> bool:
    return (path / PARAMS_NAME).is_file() and any(_SHARD.match(p.name) for p in path.iterdir())
