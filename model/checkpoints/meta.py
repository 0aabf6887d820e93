"""Meta's reference checkpoints (``consolidated.NN.pth`` + ``params.json``), Llama 1, 2, 3 and 3.1.

    from model.checkpoints.meta import load_meta, config_from_params, write_meta
    cfg, state_dict = load_meta("Meta-Llama-3.1-8B/")   # merges model-parallel shards, permutes q/k
    write_meta(reader, cfg, "out/meta")                  # streamed; loads in Meta's own Llama.build

Meta's tensor names are ours. Two things differ:
1. Model-parallel shards (one file per GPU of the original run) are merged exactly as Meta's
   ``ColumnParallelLinear``/``RowParallelLinear`` split them: wq/wk/wv/w1/w3/output along dim 0, wo/w2
   along dim 1, norms replicated. The embedding is split along the *embedding* dim (dim 1) in Llama 1/2
   (``ParallelEmbedding``) but along the *vocabulary* (dim 0) in Llama 3 (``VocabParallelEmbedding``);
   which one is told by the shard shapes, not the version.
2. Meta rotates *adjacent* pairs (2i, 2i+1); we rotate i with i + head_dim/2 (HF layout). Reordering the
   output rows of wq and wk within each head (HF's ``permute`` in ``convert_llama_weights_to_hf.py``)
   makes the two computations identical; ``unpermute_rope`` is its inverse, used for export.

``params.json`` carries no context length (Meta passes ``max_seq_len`` at build time; exports never write
one, see ``params_from_config``) and Llama 1/2 files say ``vocab_size: -1``: the vocabulary comes from the embedding shape, and the context length defaults to
the published one (2048 Llama 1, 4096 Llama 2, 8192 Llama 3, 131072 Llama 3.1) unless given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoints.common import (
    MemoryReader,
    StateDict,
    TensorSource,
    atomic_directory,
    check_state_dict,
    read_json,
    write_json,
)
from model.checkpoints.safe_load import safe_torch_load
from model.checkpoints.streaming import TensorSpec, write_torch_file
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
    """The ``params.json`` with which Meta's own ``Llama.build`` rebuilds ``cfg`` (export).

    Meta's loaders call ``ModelArgs(max_seq_len=..., max_batch_size=..., **params)``, so ``max_seq_len`` and
    ``max_batch_size`` must not be in the file (a second value is a TypeError), and every key must be a field:
    - RoPE base 10000 without scaling -> the Llama 1/2 file of ``meta-llama/llama`` (no ``rope_theta``: that
      ``ModelArgs`` has no such field and its ``precompute_freqs_cis`` uses 10000);
    - any other base -> ``rope_theta`` as in ``meta-llama/llama3`` (whose default, 500000, is not 10000);
    - Llama 3.1 scaling -> ``use_scaled_rope: true`` as in ``meta-llama/llama-models``, whose
      ``apply_scaling`` hard-codes factor 8, low 1, high 4, original context 8192.
    """
    scaling = cfg.rope_scaling
    if scaling is not None and (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                                scaling.original_max_position) != (8.0, 1.0, 4.0, 8192):
        raise ValueError(f"config {cfg.name!r}: Meta's reference code can only express Llama 3.1's RoPE scaling "
                         "(factor 8, low_freq_factor 1, high_freq_factor 4, original 8192; llama-models' "
                         f"apply_scaling hard-codes them), not {vars(scaling)}; export to --to hf instead")
    multiple_of, multiplier = meta_ffn_params(cfg)
    params: dict[str, Any] = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                              "n_kv_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size,
                              "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
                              "norm_eps": cfg.norm_eps}
    if cfg.rope_theta != 10000.0 or scaling is not None:
        params["rope_theta"] = cfg.rope_theta
    if scaling is not None:
        params["use_scaled_rope"] = True
    return params


def meta_hidden_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Meta's ``FeedForward`` hidden size rule (identical in llama, llama3 and llama-models)."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(cfg: LlamaConfig) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` that make Meta's rule give ``cfg.ffn_dim``.

    A config from our registry carries them; one read from Hugging Face only knows ``intermediate_size``, so
    the pair is searched: no multiplier with the largest power-of-two ``multiple_of`` that works, else the
    multiplier ``ffn_dim / int(8 dim / 3)`` (rounded up a hair against float truncation).
    """
    target = cfg.ffn_dim
    if meta_hidden_dim(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier) == target:
        return cfg.multiple_of, cfg.ffn_dim_multiplier
    powers = [2**k for k in range(12, -1, -1) if target % 2**k == 0]
    for multiple_of in powers:
        if meta_hidden_dim(cfg.dim, multiple_of, None) == target:
            return multiple_of, None
    base = int(2 * (4 * cfg.dim) / 3)
    for multiple_of in powers:
        multiplier = round(target / base + 1e-9, 12)
        if meta_hidden_dim(cfg.dim, multiple_of, multiplier) == target:
            return multiple_of, multiplier
    raise ValueError(f"config {cfg.name!r}: ffn hidden size {target} (dim {cfg.dim}) cannot be expressed with "
                     "multiple_of / ffn_dim_multiplier in params.json")


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
    check_state_dict(state_dict, cfg, source="save_meta(state_dict)")
    return write_meta(MemoryReader(cfg, state_dict, source="save_meta(state_dict)"), cfg, out_dir,
                      overwrite=overwrite)


def write_meta(source: TensorSource, cfg: LlamaConfig, out_dir: str | Path, *, overwrite: bool = False,
               dtype: torch.dtype | None = None) -> Path:
    """Stream ``source`` into ``consolidated.00.pth`` + ``params.json`` with one tensor in memory at a time.

    q/k rows go back to Meta's adjacent-pair RoPE layout; a tied head is written out as its own
    ``output.weight`` (Meta's ``Transformer`` always has one). ``dtype`` casts (Meta ships bf16).
    """
    params = params_from_config(cfg)
    specs = [TensorSpec(s.name, s.shape, dtype or s.dtype) for s in source.specs()]

    def fetch(name: str) -> Tensor:
        tensor = source.read(name)
        if name.endswith("attention.wq.weight"):
            return unpermute_rope(tensor, cfg.n_heads)
        if name.endswith("attention.wk.weight"):
            return unpermute_rope(tensor, cfg.kv_heads)
        return tensor

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_json(tmp / PARAMS_NAME, params)
        write_torch_file(tmp / "consolidated.00.pth", specs, fetch)
    return out_dir


def is_meta_dir(path: Path) -> bool:
    return (path / PARAMS_NAME).is_file() and any(_SHARD.match(p.name) for p in path.iterdir())
