"""The Llama network (Llama 1, 2 and 3.1): pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention.

    from model.config import get_config
    from model.llama import Llama
    model = Llama(get_config("debug_tiny"))
    logits = model(tokens)                      # tokens: Long[batch, seq] -> Float[batch, seq, vocab]

A block reads like the paper (and Meta's reference):

    h   = x + attention(attention_norm(x))
    out = h + feed_forward(ffn_norm(h))

Departures from Meta's reference code, and why:
- RoPE uses the *half-split* pairing (dimension i rotates with i + head_dim/2, as in HF transformers and
  GPT-NeoX) instead of adjacent pairs. Meta and llama2.c checkpoints are permuted on import
  (``model/checkpoints``), HF checkpoints load unchanged, and the rotation is two contiguous half-width
  multiplies instead of strided complex views.
- Attention runs through ``scaled_dot_product_attention`` with ``enable_gqa``: key/value heads are never
  copied ``n_heads / n_kv_heads`` times.
- fp32 on the CPU (TP = 1) every block takes the fused path of ``model/kernels``: RMSNorm, q/k/v + RoPE,
  gate/up + SwiGLU and block-causal attention as single autograd nodes over C kernels and oneDNN GEMMs
  (~15% faster than HF's model for forward+backward, RESULTS.md). Each branch below states which path it is;
  the eager formulas stay the reference (``kernels.disabled()``) and the path for GPUs, bf16 and TP > 1.
- Optional ``document_ids`` give the Llama 3 document mask for packed sequences: a token attends only to
  earlier tokens of its own document.
- All linear layers come from a ``LayerFactory`` (``model/layers.py``), so tensor parallelism swaps the
  layers, not the math. Under TP the heads below are this rank's heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from model import kernels, prepack
from model.config import LlamaConfig, RopeScaling
from model.layers import LayerFactory, LocalLayers


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 like Meta's reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if kernels.applies(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        # The hand-written form measured faster than F.rms_norm on CPU (torch 2.13), and is bitwise the same.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ---------------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------------
def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """``theta ** (-2i / head_dim)``, with Llama 3.1's frequency-dependent scaling when configured.

    Llama 3.1 (``use_scaled_rope``): wavelengths shorter than ``original / high_freq_factor`` keep their
    frequency, longer than ``original / low_freq_factor`` are divided by ``factor``, and those in between
    are interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
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
            angles = torch.outer(torch.arange(size, dtype=torch.float32), self.inv_freq_cpu).to(device)
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


# ---------------------------------------------------------------------------------------------------
# KV cache and attention masks
# ---------------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding, ``[batch, local_kv_heads, max_len, head_dim]``.

    ``key_valid [batch, max_len]`` marks real (non-padding) slots; prompts of different lengths are
    left-padded so every row writes the same slot at every step. ``packed``: the model's weights prepacked
    for single-token decode steps on CPU (``model/prepack.py``), or None.
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_valid: Tensor
    length: int = 0
    packed: prepack.PackedWeights | None = None

    @classmethod
    def allocate(cls, model: Llama, *, batch: int, max_len: int, dtype: torch.dtype | None = None,
                 prepack_weights: bool = True) -> KVCache:
        """Empty cache for ``batch`` rows of up to ``max_len`` tokens. ``prepack_weights``: pack the weights
        for the decode steps when the model is eligible (``model.prepack.pack_for_decode``)."""
        attention = model.layers[0].attention
        param = next(model.parameters())
        shape = (batch, attention.n_kv_heads, max_len, attention.head_dim)
        dtype = dtype or param.dtype
        keys = [torch.empty(shape, dtype=dtype, device=param.device) for _ in model.layers]
        values = [torch.empty(shape, dtype=dtype, device=param.device) for _ in model.layers]
        key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=param.device)
        packed = prepack.pack_for_decode(model, batch=batch) if prepack_weights else None
        return cls(keys=keys, values=values, key_valid=key_valid, packed=packed)

    def packed_block(self, layer_index: int, seq: int) -> prepack.BlockWeights | None:
        """A block's packed weights when this forward is a no-grad single-token decode step, else None."""
        if self.packed is None or seq != 1 or torch.is_grad_enabled():
            return None
        return self.packed.blocks[layer_index]


def document_causal_mask(document_ids: Tensor) -> Tensor:
    """Boolean ``[b, 1, s, s]`` mask: causal, and no attention across document boundaries (Llama 3)."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_document & causal).unsqueeze(1)


def cached_attention_mask(cache: KVCache, query_len: int) -> Tensor | None:
    """Mask for ``query_len`` new tokens written at slots ``[cache.length, cache.length + query_len)``.

    Returns ``None`` when plain causal attention is exact (no padding in the batch), so SDPA can use its
    fused causal kernels.
    """
    start, end = cache.length, cache.length + query_len
    valid = cache.key_valid[:, :end]
    if bool(valid.all()) and (start == 0 or query_len == 1):
        return None
    query_slots = torch.arange(start, end, device=valid.device)
    causal = torch.arange(end, device=valid.device)[None, :] <= query_slots[:, None]
    return (causal[None] & valid[:, None, :]).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------------
def _all_plain_linear(*modules: nn.Module) -> bool:
    return all(isinstance(m, nn.Linear) for m in modules)


def fused_linear(x: Tensor, *layers: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` as one matmul over the concatenated weights.

    Parameters stay separate (checkpoint names, tensor-parallel sharding and optimizer state are untouched);
    only the GEMM is merged: one [tokens, dim] x [dim, q+k+v] product instead of three narrower ones measured
    ~12% faster forward+backward on CPU for the 25M benchmark model. Used for multi-token inputs at TP=1 when
    the fused CPU path does not apply (GPU, bf16); single-token decode keeps separate calls, where the weight
    concatenation would cost more than it saves.
    """
    weight = torch.cat([layer.weight for layer in layers])
    return F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE. Heads are this tensor-parallel rank's heads."""

    def __init__(self, cfg: LlamaConfig, layers: LayerFactory) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_heads = layers.local_heads(cfg.n_heads)
        self.n_kv_heads = layers.local_kv_heads(cfg.kv_heads)
        self.wq = layers.column(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = layers.kv_projection(cfg.dim, n_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)
        self.wv = layers.kv_projection(cfg.dim, n_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)
        self.wo = layers.row(cfg.n_heads * cfg.head_dim, cfg.dim)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        *,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
    ) -> Tensor:
        batch, seq, _ = x.shape
        packed = cache.packed_block(layer_index, seq) if cache is not None else None
        # Multi-token inputs only: a decode step calls the three modules (or their packed copy), and reading a
        # child's weight directly is what ZeRO-3 must gather outside that child's own forward.
        fused = seq > 1 and _all_plain_linear(self.wq, self.wk, self.wv)  # (packed is None when seq > 1)
        weights = (self.wq.weight, self.wk.weight, self.wv.weight) if fused else ()
        if fused and kernels.applies(x, *weights):
            cos, sin = (t.squeeze(2) for t in rope)
            q, k, v = kernels.qkv_rotary(x, *weights, cos, sin, heads=self.n_heads, kv_heads=self.n_kv_heads,
                                         head_dim=self.head_dim)
        else:
            if packed is not None:  # decode step on CPU: one GEMM over the packed [wq; wk; wv]
                kv_width = self.n_kv_heads * self.head_dim
                q, k, v = prepack.linear(x, packed.qkv).split([self.n_heads * self.head_dim, kv_width, kv_width],
                                                              -1)
            elif fused:
                q, k, v = fused_linear(x, self.wq, self.wk, self.wv)
            else:
                q, k, v = self.wq(x), self.wk(x), self.wv(x)
            q = q.view(batch, seq, self.n_heads, self.head_dim)
            k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
            v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is None and kernels.attention_applies(q, k, v, seq):
            # Without a cache the mask is None (causal) or the document mask, as causal_attention requires.
            out = kernels.causal_attention(q, k, v, mask).view(batch, seq, self.n_heads * self.head_dim)
            return self.wo(out)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, head_dim]

        is_causal = mask is None
        if cache is not None:
            end = cache.length + seq
            cache.keys[layer_index][:, :, cache.length : end] = k
            cache.values[layer_index][:, :, cache.length : end] = v
            k, v = cache.keys[layer_index][:, :, :end], cache.values[layer_index][:, :, :end]
            # A single new token attends to every cached key: no causal mask needed.
            is_causal = mask is None and cache.length == 0 and seq > 1
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return prepack.linear(out, packed.wo) if packed is not None else self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: LlamaConfig, layers: LayerFactory) -> None:
        super().__init__()
        self.w1 = layers.column(cfg.dim, cfg.ffn_dim)
        self.w3 = layers.column(cfg.dim, cfg.ffn_dim)
        self.w2 = layers.row(cfg.ffn_dim, cfg.dim)

    def forward(self, x: Tensor, *, packed: prepack.BlockWeights | None = None) -> Tensor:
        """``packed``: this block's prepacked weights during a CPU decode step (``KVCache.packed_block``)."""
        if packed is not None:
            gate, up = prepack.linear(x, packed.gate_up).chunk(2, dim=-1)
            return prepack.linear(F.silu(gate) * up, packed.w2)
        if x.shape[1] > 1 and _all_plain_linear(self.w1, self.w3):
            if kernels.applies(x, self.w1.weight, self.w3.weight):
                return self.w2(kernels.gate_up_silu(x, self.w1.weight, self.w3.weight))
            gate, up = fused_linear(x, self.w1, self.w3)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layers: LayerFactory, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layers)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg, layers)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], *, mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask=mask, cache=cache, layer_index=self.layer_index)
        packed = cache.packed_block(self.layer_index, x.shape[1]) if cache is not None else None
        return h + self.feed_forward(self.ffn_norm(h), packed=packed)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
class Llama(nn.Module):
    """Embedding -> ``n_layers`` blocks -> RMSNorm -> output head (untied unless ``tie_embeddings``)."""

    def __init__(self, cfg: LlamaConfig, *, layers: LayerFactory | None = None) -> None:
        super().__init__()
        cfg.validate()
        layers = layers or LocalLayers()
        self.config = cfg
        self.tok_embeddings = layers.embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, layers, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = layers.output_head(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = RotaryEmbedding(cfg)
        self.checkpoint_every = 0
        """Activation checkpointing: keep only the inputs of segments of N blocks, recompute in backward; 0 = off."""

    def forward(
        self,
        tokens: Tensor,
        *,
        positions: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits ``[b, s, vocab]`` (or final-norm hidden states ``[b, s, dim]`` with ``return_hidden``).

        positions: ``[b or 1, s]`` RoPE positions; default ``arange`` continuing after the cache.
        document_ids: ``[b, s]``; tokens attend only within their own document (packed sequences).
        cache: a ``KVCache``; new keys/values are written at ``cache.length`` and the length advanced.
        """
        h = self.tok_embeddings(tokens)
        mask = None
        if document_ids is not None:
            mask = document_causal_mask(document_ids)
        elif cache is not None:
            mask = cached_attention_mask(cache, tokens.shape[1])
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        rope = self.rotary(positions)
        if self.checkpoint_every and self.training and cache is None:
            h = self._checkpointed_blocks(h, rope, mask)
        else:
            for block in self.layers:
                h = block(h, rope, mask=mask, cache=cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    def _checkpointed_blocks(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        """Segments of ``checkpoint_every`` blocks under non-reentrant checkpointing (bitwise the same result)."""

        def segment(x: Tensor, blocks: list[nn.Module]) -> Tensor:
            for block in blocks:
                x = block(x, rope, mask=mask)
            return x

        blocks = list(self.layers)
        for start in range(0, len(blocks), self.checkpoint_every):
            chunk = blocks[start : start + self.checkpoint_every]
            h = torch.utils.checkpoint.checkpoint(segment, h, chunk, use_reentrant=False)
        return h

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_llama_weights(model: nn.Module, *, seed: int, std: float = 0.02, n_layers: int | None = None,
                       native_name: Callable[[str], str] | None = None) -> None:
    """Initialise every weight from ``seed`` alone, independent of tensor- and pipeline-parallel layout.

    Each parameter's *full* tensor is drawn from a generator seeded by ``(seed, native parameter name)`` and
    then cut to this rank's shard (``param.tp_shard`` set by the parallel layers; identity at TP=1), so TP=1
    and TP=8 start from the same model. ``native_name`` maps a module's own parameter names to the names of
    the plain ``Llama`` (pipeline stages call their blocks ``3.attention.wq.weight``, not
    ``layers.2.attention.wq.weight``). Linear and embedding weights ~ N(0, std); the output projections of
    each residual branch (``wo``, ``w2``) use ``std / sqrt(2 * n_layers)`` (GPT-2 / Megatron scaled init);
    norms are ones.
    """
    import zlib

    depth = n_layers if n_layers is not None else model.config.n_layers
    depth_std = std / math.sqrt(2 * depth)
    with torch.no_grad():
        for own_name, param in model.named_parameters():
            name = native_name(own_name) if native_name else own_name
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            full_shape = getattr(param, "tp_full_shape", param.shape)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            scale = depth_std if name.endswith(("wo.weight", "w2.weight")) else std
            full = torch.randn(full_shape, generator=generator) * scale
            shard = getattr(param, "tp_shard", None)
            param.copy_(shard(full) if shard is not None else full)
