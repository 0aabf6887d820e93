"""Rotary position embedding (RoPE) with Llama 3.1's frequency scaling, in the half-split layout.

    from model.rope import RotaryEmbedding, apply_rotary
    rotary = RotaryEmbedding(cfg)                    # cos/sin tables, grown on demand per device
    cos, sin = rotary(positions)                     # positions: Long[b or 1, s]
    q = apply_rotary(q, cos, sin)                    # q: [b, s, heads, head_dim]

Departure from Meta's reference: dimension i rotates with i + head_dim/2 (as in HF transformers and GPT-NeoX)
instead of adjacent pairs. Meta and llama2.c checkpoints are permuted on import (``model/checkpoints``), HF
checkpoints load unchanged, and the rotation is two contiguous half-width multiplies instead of strided complex
views. The fused CPU path (``model.kernels.qkv_rotary``) applies the same rotation inside its projection kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.config import LlamaConfig, RopeScaling


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """``theta ** (-2i / head_dim)``, with Llama 3.1's frequency-dependent scaling when configured.

    Llama 3.1 (``use_scaled_rope``): wavelengths shorter than ``original / high_freq_factor`` keep their
    frequency, longer than ``original / low_freq_factor`` are divided by ``factor``, and those in between
    are interpolated smoothly.
    """
    # An explicit device: a model built under ``torch.device("meta")`` (``model/materialize.py``) still gets real tables.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if scaling is None:
        return inv_freq.float()
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, interpolated)
    scaled = torch.where(wavelen < high_wavelen, inv_freq, scaled)
    return scaled.float()


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables (not parameters, not in the state dict), grown on demand per device."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.inv_freq_cpu = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _table(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 2 * cached[0].shape[0] if cached else 256)
            # Angles in fp32 from fp64-exact positions, like HF's computation (position * inv_freq).
            angles = torch.outer(torch.arange(size, dtype=torch.float32, device="cpu"), self.inv_freq_cpu).to(device)
            cached = (angles.cos(), angles.sin())
            self._tables[device] = cached
        return cached

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape ``[batch or 1, seq, 1, head_dim/2]`` for integer ``positions [b or 1, seq]``."""
        cos, sin = self._table(int(positions.max()) + 1, positions.device)
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [b, s, heads, head_dim]``: dimension i pairs with i + head_dim/2 (half-split layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)

