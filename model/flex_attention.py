"""The document mask on GPUs without a dense mask: FlexAttention with a document block mask (what torchtitan runs).

    from model.flex_attention import FlexDocumentAttention, document_block_mask
    kernel = FlexDocumentAttention()           # an attention kernel of model/attention.py (registered there)
    out = kernel(q, k, v, mask)                # q [b, s, heads, d], k/v [b, s, kv_heads, d]; mask.document_ids

Why: a dense boolean ``[b, 1, s, s]`` mask keeps SDPA off its flash kernel (it falls back to the
memory-efficient or the math kernel and reads b x s^2 mask bytes), so Llama 3's document mask cost most of the
GPU speed. ``torch.nn.attention.flex_attention`` takes a *block* mask instead: for every 128 x 128 tile it
records whether the tile is empty (skipped), full (no per-element mask) or partial (``mask_mod`` evaluated
in the kernel), built once per forward (``AttentionMask.memo``) from the ``[b, s]`` document ids, so memory is
O(b x (s/128)^2) and tiles across documents cost nothing. The kernel saves q, k, v, the output and the fp32
logsumexp for backward, like flash attention: the planner's activation model (``launch/planner.py``,
``flash_attention=True``: no s^2 term) is what runs.

When it runs: CUDA tensors, document ids given, no KV cache (training and scoring forwards); generation and
plain causal attention stay on SDPA (flash). ``flex_attention`` is compiled once per process (Triton);
``LLAMA_FLEX_ATTENTION=0`` turns this kernel off (SDPA with the dense mask then runs, as before).
On CPU, torch 2.13 runs FlexAttention's forward only (no backward), so it is not chosen there; the tests call
it directly on CPU to check it equals the dense mask (``tests/unit/test_flex_attention.py``) and train with it
on the GPU (``tests/gpu``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

BLOCK = 128
"""FlexAttention's tile (its default ``BLOCK_SIZE``)."""


def available() -> bool:
    """This torch has FlexAttention and the kernel is not switched off (``LLAMA_FLEX_ATTENTION=0``)."""
    if os.environ.get("LLAMA_FLEX_ATTENTION", "1") == "0":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def document_mask_mod(document_ids: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """``mask_mod(b, h, q, kv)``: causal, and the query and the key in the same document."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    return mask_mod


@functools.cache
def _compiled(name: str) -> Any:
    from torch.nn.attention import flex_attention as flex

    # Compiled once per process (torchtitan's FlexAttentionWrapper does the same); the eager versions
    # materialise the full s x s score matrix and exist for debugging only.
    return torch.compile(getattr(flex, name), dynamic=False)


def document_block_mask(document_ids: Tensor, *, compiled: bool | None = None) -> Any:
    """The ``BlockMask`` of the document mask for ``[b, s]`` document ids (compiled on CUDA: no s x s tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq = document_ids.shape
    use_compiled = document_ids.is_cuda if compiled is None else compiled
    build = _compiled("create_block_mask") if use_compiled else create_block_mask
    return build(document_mask_mod(document_ids), B=batch, H=None, Q_LEN=seq, KV_LEN=seq,
                 device=document_ids.device, BLOCK_SIZE=BLOCK)


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, *,
                            compiled: bool | None = None) -> Tensor:
    """Attention of ``q [b, s, heads, d]`` over ``k``/``v [b, s, kv_heads, d]`` under ``block_mask``."""
    from torch.nn.attention.flex_attention import flex_attention

    run = _compiled("flex_attention") if (q.is_cuda if compiled is None else compiled) else flex_attention
    out = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
              enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


class FlexDocumentAttention:
    """The attention kernel (``model/attention.py`` interface) for the document mask on CUDA."""

    name = "flex_document"

    def applies(self, q: Tensor, k: Tensor, v: Tensor, mask: Any) -> bool:
        return (q.is_cuda and mask.document_ids is not None and not mask.with_cache and q.shape[1] == k.shape[1]
                and available())

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Any) -> Tensor:
        block_mask = mask.memo("flex_block_mask", lambda: document_block_mask(mask.document_ids))
        return flex_document_attention(q, k, v, block_mask)
