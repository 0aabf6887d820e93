"""Llama model configurations: one typed dataclass and a registry of every published size.

    from model.config import get_config
    cfg = get_config("llama3_1_8b")          # ValueError listing the known names if unknown
    cfg.ffn_dim, cfg.head_dim, cfg.num_params()
    model_flops_per_token(cfg, seq_len=8192)  # training FLOPs per token: MFU in train/, launch/, benchmarks/

Shapes, FFN rounding, vocabulary, norm eps, RoPE theta and context follow Meta's reference code
(``params.json``) for Llama 1, Llama 2 and Llama 3.1. The FFN hidden size is derived exactly as Meta does:
``h = int(2 * 4 * dim / 3)``, then ``int(ffn_dim_multiplier * h)`` if a multiplier is given, then rounded
up to a multiple of ``multiple_of``. Checkpoint formats whose hidden size is arbitrary (llama2.c, some HF
configs) set ``ffn_hidden_dim`` explicitly instead.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (HF ``rope_type="llama3"``, Meta ``use_scaled_rope``)."""

    factor: float = 8.0
    """Divisor applied to low frequencies (long wavelengths)."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than ``original_max_position / low_freq_factor`` are divided by ``factor``."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than ``original_max_position / high_freq_factor`` are unchanged."""
    original_max_position: int = 8192
    """Context length the model was pretrained with before the long-context stage."""


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture of one Llama model. All fields are hyperparameters of the network itself."""

    name: str = "custom"
    """Registry name, informational."""
    dim: int = 4096
    """Model (residual stream) width."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads; ``dim`` must be divisible by it."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); ``None`` means equal to ``n_heads``."""
    vocab_size: int = 32000
    """Size of the token embedding and output head."""
    multiple_of: int = 256
    """The FFN hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Optional multiplier on the FFN hidden size (Llama 2 70B, Llama 3)."""
    ffn_hidden_dim: int | None = None
    """Explicit FFN hidden size; overrides the derivation from ``multiple_of`` and the multiplier."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """Llama 3.1 long-context frequency scaling, or ``None``."""
    max_seq_len: int = 4096
    """Longest context the model supports (RoPE tables and KV cache are sized from it)."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the output head (never in published Llamas; llama2.c models do)."""

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Number of key/value heads, resolved."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU hidden size, exactly as Meta's ``FeedForward.__init__`` computes it."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count from the shapes (no allocation)."""
        d, kv = self.dim, self.kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2  # wq, wo, wk, wv
        feed_forward = 3 * d * self.ffn_dim
        block = attention + feed_forward + 2 * d  # two RMSNorm weights
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + embeddings + d

    def validate(self) -> LlamaConfig:
        """Raise ValueError naming the field and the fix when the shapes are inconsistent."""
        if self.dim % self.n_heads:
            raise ValueError(
                f"model config {self.name!r}: dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads so that dim / n_heads is an integer head size (128 in every Llama)"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model config {self.name!r}: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.kv_heads}; grouped-query attention needs whole groups of query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config {self.name!r}: head_dim={self.head_dim} must be even for RoPE")
        for field_name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"model config {self.name!r}: {field_name} must be positive")
        return self

    # ---- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LlamaConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid model config: {err}") from err

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes).validate()


_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

_REGISTRY: dict[str, LlamaConfig] = {}


def _register(cfg: LlamaConfig) -> None:
    _REGISTRY[cfg.name] = cfg.validate()


# Llama 1 (Touvron et al. 2023): context 2048, vocab 32000, MHA.
_register(LlamaConfig(name="llama1_7b", dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6, max_seq_len=2048))
_register(LlamaConfig(name="llama1_13b", dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6, max_seq_len=2048))
_register(LlamaConfig(name="llama1_33b", dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6, max_seq_len=2048))
_register(LlamaConfig(name="llama1_65b", dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5, max_seq_len=2048))
# Llama 2: context 4096; 34B (never released) uses the Code Llama 34B shape; 70B uses GQA with 8 kv heads.
_register(LlamaConfig(name="llama2_7b", dim=4096, n_layers=32, n_heads=32))
_register(LlamaConfig(name="llama2_13b", dim=5120, n_layers=40, n_heads=40))
_register(
    LlamaConfig(name="llama2_34b", dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0)
)
_register(
    LlamaConfig(
        name="llama2_70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3,
    )
)
# Llama 3.1: 128K vocab, theta 5e5, 128K context with scaled RoPE, GQA with 8 kv heads everywhere.
_LLAMA31 = dict(vocab_size=128256, n_kv_heads=8, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, max_seq_len=131072)
_register(LlamaConfig(name="llama3_1_8b", dim=4096, n_layers=32, n_heads=32, multiple_of=1024,
                      ffn_dim_multiplier=1.3, **_LLAMA31))
_register(LlamaConfig(name="llama3_1_70b", dim=8192, n_layers=80, n_heads=64, multiple_of=4096,
                      ffn_dim_multiplier=1.3, **_LLAMA31))
_register(LlamaConfig(name="llama3_1_405b", dim=16384, n_layers=126, n_heads=128, multiple_of=4096,
                      ffn_dim_multiplier=1.2, **_LLAMA31))

# Debug sizes: same architecture, CPU-friendly. "tiny" ones run in tests in milliseconds.
_register(LlamaConfig(name="debug_tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                      multiple_of=32, max_seq_len=256))
_register(LlamaConfig(name="debug_llama2_tiny", dim=64, n_layers=2, n_heads=4, vocab_size=512,
                      multiple_of=32, max_seq_len=256))
_register(LlamaConfig(name="debug_llama3_tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                      multiple_of=32, rope_theta=500000.0,
                      rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position=64),
                      max_seq_len=512))
# ~15M parameters: the quickstart / pretraining-on-CPU size (with an 8K vocabulary).
_register(LlamaConfig(name="debug_15m", dim=384, n_layers=6, n_heads=6, n_kv_heads=2, vocab_size=8192,
                      multiple_of=64, max_seq_len=1024))
# ~25M parameters (dim 512, 8 layers, GQA): the CPU benchmark size.
_register(LlamaConfig(name="bench_25m", dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096,
                      multiple_of=128, max_seq_len=2048))
# ~1.5B parameters, Llama 3 style (Llama 3.2 1B's shape, untied head): the single-GPU MFU benchmark size.
_register(LlamaConfig(name="bench_1p5b", dim=2048, n_layers=16, n_heads=32, multiple_of=256,
                      ffn_dim_multiplier=1.5, **{**_LLAMA31, "max_seq_len": 8192}))


def model_flops_per_token(cfg: LlamaConfig, seq_len: int, *, causal: bool = True) -> float:
    """Model FLOPs per trained token (forward + backward), the single source of truth for MFU
    (the planner, the training metrics and the benchmarks all read it).

    ``6 * (non-embedding params + output head) + 12 * n_layers * dim * seq_len``, the PaLM (Chowdhery et al.
    2022, app. B) / Megatron convention. The input embedding is a lookup (no FLOPs) and is left out; the
    output head is a matmul and is counted (also when tied). The attention term counts QK^T and PV
    (2 matmuls x 2 FLOPs x seq_len x dim per layer forward, x3 for fwd+bwd). With ``causal=True`` it is
    halved: flash kernels skip the masked upper triangle, so only half of that work is done or useful.
    PaLM counts the full square; pass ``causal=False`` to reproduce PaLM-style numbers. Recomputation is
    never counted (that is hardware FLOPs, not model FLOPs).
    """
    embedding = cfg.vocab_size * cfg.dim
    head = cfg.vocab_size * cfg.dim
    non_embedding = cfg.num_params() - embedding - (0 if cfg.tie_embeddings else head)
    attention = 12 * cfg.n_layers * cfg.dim * seq_len * (0.5 if causal else 1.0)
    return 6.0 * (non_embedding + head) + attention


def known_configs() -> list[str]:
    """All registered names, published sizes first."""
    return list(_REGISTRY)


def get_config(name: str) -> LlamaConfig:
    """Look up a registered config; unknown names raise ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a known model config; known: {', '.join(_REGISTRY)}") from None
