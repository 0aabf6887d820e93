"""Attention kernels: how ``softmax(q k^T / sqrt(d)) v`` is computed, chosen per call; and the masks they read.

    from model.attention import AttentionMask, attend
    mask = AttentionMask.for_forward(document_ids=docs, cache=None, query_len=s)   # once per model forward
    out = attend(q, k, v, mask)          # q [b, s, heads, d], k/v [b, t, kv_heads, d] -> [b, s, heads, d]

The block (``model/llama.py``) only says "attention"; which kernel runs is decided here, by
``choose_kernel``: the first entry of ``KERNELS`` whose ``applies`` is true, unless a module pins one
(``Attention.kernel``):

    kernel      runs when                                                 what it is
    fused_cpu      fp32 on CPU, kernels built, 1 < s <= 1024, no KV     block-causal C kernels (``model/kernels``):
                   cache                                                only the visible key blocks are computed
    flex_document  CUDA, document ids, no KV cache                      FlexAttention with a document block mask
                                                                        (``model/flex_attention.py``): no dense
                                                                        ``[b, 1, s, s]`` mask on GPUs
    sdpa           always (the fallback; on GPUs plain causal           ``F.scaled_dot_product_attention`` with
                   training and generation)                             ``enable_gqa``; flash when the mask is
                                                                        plain causal

Adding a kernel (a context-parallel ring, flash-attn's varlen kernel): write a class with
``name``, ``applies(q, k, v, mask)`` and ``__call__(q, k, v, mask)`` and insert it into ``KERNELS`` before
``sdpa`` (``register_kernel``), or pin an instance on the modules that must use it (``Attention.kernel``;
``model.context_parallel.ContextParallel.pin`` does that for context parallelism). A kernel reads the mask in the form it needs:
``mask.document_ids`` (the packed documents), ``mask.dense()`` (a boolean ``[b, 1, s, t]`` tensor, built once
per forward and shared by every block), or its own form built once per forward with ``mask.memo(key, build)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from model import kernels
from model.flex_attention import FlexDocumentAttention


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------
def document_causal_mask(document_ids: Tensor) -> Tensor:
    """Boolean ``[b, 1, s, s]`` mask: causal, and no attention across document boundaries (Llama 3)."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_document & causal).unsqueeze(1)


def cached_attention_mask(cache: Any, query_len: int) -> Tensor | None:
    """Mask for ``query_len`` new tokens written at slots ``[cache.length, cache.length + query_len)`` of a
    ``model.llama.KVCache``.

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


@dataclass(eq=False)
class AttentionMask:
    """Which keys each query of one forward may see; built once per forward and read by every block.

    Without a dense form (``dense()`` is None), ``causal`` says whether a query sees only keys up to its own
    position (training, prefill) or every key (a one-token decode step).
    """

    document_ids: Tensor | None = None
    """``[b, s]`` document of each token of packed sequences: tokens attend only within their document."""
    padding: Tensor | None = None
    """Boolean ``[b, 1, s, t]`` mask of a KV-cache step with left-padded prompts (``cached_attention_mask``)."""
    causal: bool = True
    """When there is no dense mask: hide keys after the query (else every key is visible)."""
    with_cache: bool = False
    """Keys and values come from a KV cache (generation), not only from this forward's tokens."""
    _forms: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def for_forward(cls, *, document_ids: Tensor | None, cache: Any, query_len: int) -> AttentionMask:
        """The mask of one model forward: the document mask if ``document_ids``, else the KV cache's."""
        if cache is None:
            return cls(document_ids=document_ids)
        padding = None if document_ids is not None else cached_attention_mask(cache, query_len)
        # A single new token attends to every cached key: no causal mask needed.
        return cls(document_ids=document_ids, padding=padding, causal=cache.length == 0 and query_len > 1,
                   with_cache=True)

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """A kernel's own form of this mask, built on first use and shared by every block of the forward."""
        if key not in self._forms:
            self._forms[key] = build()
        return self._forms[key]

    def dense(self) -> Tensor | None:
        """The boolean ``[b, 1, s, t]`` mask, or None when ``causal`` alone describes it."""
        if self.document_ids is not None:
            return self.memo("dense", lambda: document_causal_mask(self.document_ids))
        return self.padding


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
class AttentionKernel(Protocol):
    """One way to compute attention. ``q [b, s, heads, d]``, ``k``/``v [b, t, kv_heads, d]`` (grouped-query:
    ``heads`` is a multiple of ``kv_heads``); returns ``[b, s, heads, d]``."""

    name: str

    def applies(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> bool: ...

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor: ...


class FusedCPUAttention:
    """``model.kernels.causal_attention``: block-causal C kernels for fp32 CPU training and scoring forwards."""

    name = "fused_cpu"

    def applies(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> bool:
        # The kernel takes None (causal) or the document mask, both inside the causal triangle.
        return not mask.with_cache and kernels.attention_applies(q, k, v, q.shape[1])

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        return kernels.causal_attention(q, k, v, mask.dense())


class SDPAAttention:
    """``F.scaled_dot_product_attention``; key/value heads are never copied (``enable_gqa``)."""

    name = "sdpa"

    def applies(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> bool:
        return True

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        dense = mask.dense()
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dense,
            is_causal=dense is None and mask.causal, enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)


KERNELS: list[AttentionKernel] = [FusedCPUAttention(), FlexDocumentAttention(), SDPAAttention()]
"""Tried in order by ``choose_kernel``; the last one (SDPA) always applies."""


def register_kernel(kernel: AttentionKernel, *, before: str = "sdpa") -> None:
    """Insert ``kernel`` into ``KERNELS`` ahead of the kernel named ``before`` (replacing one of its name)."""
    KERNELS[:] = [k for k in KERNELS if k.name != kernel.name]
    KERNELS.insert(next(i for i, k in enumerate(KERNELS) if k.name == before), kernel)


def choose_kernel(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> AttentionKernel:
    """The first kernel of ``KERNELS`` that applies to these tensors and this mask."""
    return next(kernel for kernel in KERNELS if kernel.applies(q, k, v, mask))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *,
           kernel: AttentionKernel | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` by ``kernel`` if given, else by the one ``choose_kernel`` picks."""
    return (kernel or choose_kernel(q, k, v, mask))(q, k, v, mask)
