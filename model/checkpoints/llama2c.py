"""Karpathy's llama2.c ``.bin`` checkpoints (legacy v0, and the float32 v1 "ak42" export).

    from model.checkpoints.llama2c import load_llama2c
    cfg, state_dict = load_llama2c("stories260K.bin")

v0 layout: an int32 header ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``, then
float32 arrays, matrices ``(out, in)`` stacked over layers: ``tok_emb[V,D], rms_att[L,D], wq[L,D,D],
wk[L,KV,D], wv[L,KV,D], wo[L,D,D], rms_ffn[L,D], w1[L,H,D], w2[L,D,H], w3[L,H,D], rms_final[D],
freq_cis_real[S,hd/2], freq_cis_imag[S,hd/2]`` and, only when ``vocab_size`` is *negative*, an untied
classifier ``wcls[V,D]``; a positive vocab size means the classifier is the embedding (tied).
v1 (``export.py --version 1``): magic ``0x616b3432``, version 1, the same 7 ints, a shared-classifier
byte, zero padding to 256 bytes, then norms first: ``rms_att, rms_ffn, rms_final, tok_emb, wq, wk, wv,
wo, w1, w2, w3`` and ``wcls`` unless shared. v2 (int8 quantised) is refused.

llama2.c rotates adjacent pairs like Meta, so wq/wk are permuted into our half-split layout (wk with the
key/value head count). Norm eps is 1e-5 and RoPE theta 10000, fixed in llama2.c.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from model.checkpoints.common import StateDict, check_state_dict, tie_output
from model.checkpoints.meta import permute_rope
from model.config import LlamaConfig

MAGIC = 0x616B3432  # "ak42"
V0_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256


def _read_header(path: Path) -> tuple[int, tuple[int, ...], bool | None, int]:
    """``(version, 7 ints, shared_classifier or None for v0, data offset)``."""
    with path.open("rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < V0_HEADER_BYTES:
        raise ValueError(f"{path}: {len(head)} bytes is too short for a llama2.c header (28 bytes)")
    magic = struct.unpack("<I", head[:4])[0]
    if magic != MAGIC:
        return 0, struct.unpack("<7i", head[:V0_HEADER_BYTES]), None, V0_HEADER_BYTES
    version = struct.unpack("<i", head[4:8])[0]
    if version != 1:
        raise ValueError(f"{path}: llama2.c format version {version} is not supported (only v0 and float32 v1); "
                         "re-export with `export.py --version 1`")
    if len(head) < 37:
        raise ValueError(f"{path}: truncated llama2.c v1 header")
    return 1, struct.unpack("<7i", head[8:36]), bool(head[36]), V1_HEADER_BYTES


def _array_shapes(version: int, header: tuple[int, ...], shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    vocab = abs(vocab)
    kv = n_kv_heads * (dim // n_heads)
    L = n_layers
    matrices = [("wq", (L, dim, dim)), ("wk", (L, kv, dim)), ("wv", (L, kv, dim)), ("wo", (L, dim, dim))]
    ffn = [("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim))]
    if version == 0:
        head_half = (dim // n_heads) // 2
        arrays = [("tok_emb", (vocab, dim)), ("rms_att", (L, dim)), *matrices, ("rms_ffn", (L, dim)), *ffn,
                  ("rms_final", (dim,)), ("freq_cis_real", (seq_len, head_half)),
                  ("freq_cis_imag", (seq_len, head_half))]
    else:
        arrays = [("rms_att", (L, dim)), ("rms_ffn", (L, dim)), ("rms_final", (dim,)), ("tok_emb", (vocab, dim)),
                  *matrices, *ffn]
    if not shared:
        arrays.append(("wcls", (vocab, dim)))
    return arrays


def read_llama2c_config(path: str | Path) -> LlamaConfig:
    """The config from the header alone (raises ValueError naming the file when it is not plausible)."""
    return _parse(Path(path))[0]


def _parse(path: Path) -> tuple[LlamaConfig, int, bool, int, list[tuple[str, tuple[int, ...]]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: llama2.c checkpoint not found")
    version, header, shared, offset = _read_header(path)
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    if shared is None:
        shared = vocab > 0
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab == 0 or dim % n_heads:
        raise ValueError(f"{path}: implausible llama2.c header {list(header)} "
                         "(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)")
    cfg = LlamaConfig(name=path.stem, dim=dim, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
                      vocab_size=abs(vocab), ffn_hidden_dim=hidden, norm_eps=1e-5, rope_theta=10000.0,
                      max_seq_len=seq_len, tie_embeddings=shared)
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    arrays = _array_shapes(version, header, shared)
    expected = offset + 4 * sum(int(np.prod(shape)) for _, shape in arrays)
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path}: file size is {actual} bytes but its llama2.c v{version} header {list(header)} implies "
            f"{expected} bytes ({'truncated' if actual < expected else 'trailing data'}); the file is "
            "corrupt or not a llama2.c checkpoint"
        )
    return cfg, version, shared, offset, arrays


def load_llama2c(path: str | Path) -> tuple[LlamaConfig, StateDict]:
    """Read a llama2.c ``.bin`` into ``(config, state_dict)`` in our layout."""
    path = Path(path)
    cfg, _, shared, offset, arrays = _parse(path)
    data = np.memmap(path, dtype="<f4", mode="r", offset=offset)
    raw: dict[str, torch.Tensor] = {}
    start = 0
    for name, shape in arrays:
        count = int(np.prod(shape))
        raw[name] = torch.from_numpy(np.array(data[start : start + count]).reshape(shape))
        start += count
    del data

    sd: StateDict = {"tok_embeddings.weight": raw["tok_emb"], "norm.weight": raw["rms_final"]}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        sd[p + "attention_norm.weight"] = raw["rms_att"][i]
        sd[p + "attention.wq.weight"] = permute_rope(raw["wq"][i], cfg.n_heads)
        sd[p + "attention.wk.weight"] = permute_rope(raw["wk"][i], cfg.kv_heads)
        sd[p + "attention.wv.weight"] = raw["wv"][i]
        sd[p + "attention.wo.weight"] = raw["wo"][i]
        sd[p + "ffn_norm.weight"] = raw["rms_ffn"][i]
        sd[p + "feed_forward.w1.weight"] = raw["w1"][i]
        sd[p + "feed_forward.w2.weight"] = raw["w2"][i]
        sd[p + "feed_forward.w3.weight"] = raw["w3"][i]
    # Own storage per tensor: slices of the stacked arrays would keep all layers alive and save badly.
    sd = {name: t.contiguous().clone() for name, t in sd.items()}
    if shared:
        tie_output(sd, cfg)
    else:
        sd["output.weight"] = raw["wcls"]
    check_state_dict(sd, cfg, source=path)
    return cfg, sd


def looks_like_llama2c(path: Path) -> bool:
    """A file whose header parses and whose size matches it exactly."""
    try:
        _parse(path)
    except (ValueError, OSError):
        return False
    return True
