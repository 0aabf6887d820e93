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
  GPT-NeoX) instead of adjacent pairs (``model/rope.py``); Meta and llama2.c checkpoints are permuted on import.
- Attention reads projection -> RoPE -> attention -> output; *how* each step runs is chosen per call outside
  the block: the projections in ``model/projections.py`` (fused CPU kernels, prepacked decode, one fused GEMM,
  or one call per layer), the attention kernel in ``model/attention.py`` (block-causal CPU kernels or
  ``scaled_dot_product_attention`` with ``enable_gqa``, so key/value heads are never copied; a new backend
  plugs in there). fp32 on the CPU (TP = 1) every block takes the fused path of ``model/kernels``: RMSNorm,
  q/k/v + RoPE, gate/up + SwiGLU and block-causal attention as single autograd nodes over C kernels and oneDNN
  GEMMs (~15% faster than HF's model for forward+backward, RESULTS.md); the eager formulas stay the reference
  (``kernels.disabled()``) and the path for GPUs, bf16 and TP > 1.
- Optional ``document_ids`` give the Llama 3 document mask for packed sequences: a token attends only to
  earlier tokens of its own document.
- All linear layers come from a ``LayerFactory`` (``model/layers.py``), so tensor parallelism swaps the
  layers, not the math. Under TP the heads below are this rank's heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from model import kernels, prepack
from model.attention import AttentionKernel, AttentionMask, attend
from model.config import LlamaConfig
from model.layers import LayerFactory, LocalLayers
from model.projections import linear_or_packed, project_qkv, swiglu_hidden
from model.rope import RotaryEmbedding


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
# KV cache
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

    def update(self, layer_index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one block's new ``k``/``v [b, s, kv_heads, head_dim]`` at ``length``; return all of its keys and
        values so far as ``[b, length + s, kv_heads, head_dim]`` views of the cache."""
        end = self.length + k.shape[1]
        self.keys[layer_index][:, :, self.length : end] = k.transpose(1, 2)
        self.values[layer_index][:, :, self.length : end] = v.transpose(1, 2)
        return (self.keys[layer_index][:, :, :end].transpose(1, 2),
                self.values[layer_index][:, :, :end].transpose(1, 2))


# ---------------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------------
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
        self.kernel: AttentionKernel | None = None
        """Pinned attention kernel (e.g. context parallelism's); None = ``model.attention.choose_kernel``."""

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], *, mask: AttentionMask | None = None,
                cache: KVCache | None = None, layer_index: int = 0) -> Tensor:
        """``x [b, s, dim]`` -> ``[b, s, dim]``. ``mask``: the forward's ``AttentionMask`` (default: causal);
        ``cache``: write this step's keys/values at ``cache.length`` and attend to every cached one."""
        packed = cache.packed_block(layer_index, x.shape[1]) if cache is not None else None
        q, k, v = project_qkv(self, x, rope, packed=packed)  # projection -> RoPE: [b, s, (kv_)heads, head_dim]
        if cache is not None:
            k, v = cache.update(layer_index, k, v)
        out = attend(q, k, v, mask if mask is not None else AttentionMask(), kernel=self.kernel)  # attention
        return linear_or_packed(self.wo, out.flatten(2), packed.wo if packed is not None else None)  # output


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: LlamaConfig, layers: LayerFactory) -> None:
        super().__init__()
        self.w1 = layers.column(cfg.dim, cfg.ffn_dim)
        self.w3 = layers.column(cfg.dim, cfg.ffn_dim)
        self.w2 = layers.row(cfg.ffn_dim, cfg.dim)

    def forward(self, x: Tensor, *, packed: prepack.BlockWeights | None = None) -> Tensor:
        """``packed``: this block's prepacked weights during a CPU decode step (``KVCache.packed_block``)."""
        hidden = swiglu_hidden(self, x, packed=packed)
        return linear_or_packed(self.w2, hidden, packed.w2 if packed is not None else None)


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
        mask = AttentionMask.for_forward(document_ids=document_ids, cache=cache, query_len=tokens.shape[1])
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
        if return_hidden:  # under sequence parallelism h is this rank's slice: the caller gets every position
            whole = getattr(self.tok_embeddings, "whole_sequence", None)
            return whole(h) if whole is not None else h
        return self.output(h)

    def _checkpointed_blocks(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: AttentionMask) -> Tensor:
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
                       native_name: Callable[[str], str] | None = None,
                       assign: Callable[[nn.Parameter, Tensor], None] | None = None,
                       only: Container[str] | None = None) -> None:
    """Initialise every weight from ``seed`` alone, independent of tensor- and pipeline-parallel layout.

    Each parameter's *full* tensor is drawn from a generator seeded by ``(seed, native parameter name)`` and
    then cut to this rank's shard (``param.tp_shard`` set by the parallel layers; identity at TP=1), so TP=1
    and TP=8 start from the same model. ``native_name`` maps a module's own parameter names to the names of
    the plain ``Llama`` (pipeline stages call their blocks ``3.attention.wq.weight``, not
    ``layers.2.attention.wq.weight``). Linear and embedding weights ~ N(0, std); the output projections of
    each residual branch (``wo``, ``w2``) use ``std / sqrt(2 * n_layers)`` (GPT-2 / Megatron scaled init);
    norms are ones; a parameter with an ``init_std`` attribute uses that (LoRA: A ~ N(0, 1/r), B = 0).
    ``assign(param, value)`` writes a parameter's value (its TP slice; default ``param.copy_``): the engine's
    writes only its partition of a ZeRO-3 parameter built partitioned, whose own shape is then ``ds_shape``.
    ``only``: the native names to initialise (the few a checkpoint lacks, e.g. a new reward head); default all.
    """
    import zlib

    depth = n_layers if n_layers is not None else model.config.n_layers
    depth_std = std / math.sqrt(2 * depth)
    write = assign or (lambda param, value: param.copy_(value))
    with torch.no_grad():
        for own_name, param in model.named_parameters():
            name = native_name(own_name) if native_name else own_name
            if only is not None and name not in only:
                continue
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned: the TP slice's own shape
            if name.endswith("norm.weight"):
                write(param, torch.ones(shape, dtype=param.dtype))
                continue
            full_shape = getattr(param, "tp_full_shape", shape)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            scale = getattr(param, "init_std", None)  # set by parameters with their own init (LoRA adapters)
            if scale is None:
                scale = depth_std if name.endswith(("wo.weight", "w2.weight")) else std
            full = torch.randn(full_shape, generator=generator) * scale
            shard = getattr(param, "tp_shard", None)
            write(param, shard(full) if shard is not None else full)
