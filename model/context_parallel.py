"""Context parallelism as Llama 3 runs it: one sequence split over CP ranks; attention all-gathers K and V.

    from model.context_parallel import ContextParallel
    cp = ContextParallel(group)                           # size and rank from the group (None or size 1: off)
    cp.pin(model)                                         # every Attention computes with cp.kernel
    tokens_local = cp.shard(tokens)                       # [b, S] -> [b, S / cp]: this rank's two chunks
    logits = model(tokens_local, positions=cp.positions(S), document_ids=cp.shard(document_ids))

Chunking (load balance under the causal mask): a sequence of ``S`` tokens is cut into ``2 x cp`` chunks and CP
rank ``i`` holds chunks ``i`` and ``2cp - 1 - i``, so every rank has one early (cheap) and one late
(expensive) chunk. Global positions and document ids travel with the chunks: RoPE rotates by the global
position (Llama 3.1's scaling included: it is a property of the frequencies, not of the split), and the
document mask compares the document ids of the local queries with those of all keys.

Attention (``ContextParallelAttention``): the local K and V (after RoPE) are all-gathered over the CP group,
cheap under grouped-query attention (8 KV heads for 8B-405B), and the local queries attend to every key under
the mask ``key position <= query position and same document``. The backward reduce-scatters dK/dV
(``model.comm.gather_along_dim``). The local block (``S/cp`` queries against ``S`` keys) runs the attention
backend of the device, like the non-CP path (``model/attention.py``): on CUDA with FlexAttention available,
``flex_attention`` with a block mask of ``key position <= query position and same document`` built once per
forward from the positions and document ids (no dense ``[b, 1, S/cp, S]`` mask, tiles across documents or
after the query's position skipped; the gathered keys come in rank order, chunk by chunk, so every chunk of
``S / 2cp`` tokens is contiguous in position and the tiles inside it are full or empty); elsewhere (CPU, or
``LLAMA_FLEX_ATTENTION=0``) ``scaled_dot_product_attention`` with one additive mask per forward
(``local_block_backend`` decides; ``AttentionMask.memo`` keeps either mask for all blocks).

Weights are replicated over CP: each rank's loss covers its own tokens, and the gradients are summed over the
CP group together with the data-parallel group (the trainer's reduction spans DP x CP). Checkpoints do not see
CP at all. Generation (a KV cache) runs with CP 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import comm, flex_attention
from model.attention import AttentionMask


def chunk_order(cp: int) -> list[int]:
    """The chunks of a sequence cut in ``2 cp`` in the order the CP all-gather lays them out: rank 0's two
    chunks, then rank 1's, ... (``[0, 3, 1, 2]`` for cp 2)."""
    return [c for rank in range(cp) for c in (rank, 2 * cp - 1 - rank)]


def rank_positions(seq_len: int, cp: int, rank: int, device: torch.device | str = "cpu") -> Tensor:
    """Global positions ``[S / cp]`` of the tokens CP rank ``rank`` holds: chunks ``rank`` and ``2cp-1-rank``."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x CP = {2 * cp}: context parallelism "
                         "cuts every sequence into 2 x CP equal chunks; choose train.seq_len as a multiple of it")
    chunk = seq_len // (2 * cp)
    starts = (rank * chunk, (2 * cp - 1 - rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


class ContextParallel:
    """This rank's place in its CP group: what to keep of a sequence, its positions, and the attention kernel."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.size = comm.world_size(group) if group is not None else 1
        self.rank = comm.rank(group) if group is not None else 0
        self.kernel = ContextParallelAttention(self)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def positions(self, seq_len: int, device: torch.device | str = "cpu") -> Tensor:
        """``[1, S / cp]`` global positions of this rank's tokens (RoPE and the mask use them)."""
        return rank_positions(seq_len, self.size, self.rank, device)[None]

    def shard(self, tensor: Tensor, *, dim: int = 1) -> Tensor:
        """This rank's two chunks of ``tensor`` along the sequence dimension ``dim``."""
        index = rank_positions(tensor.shape[dim], self.size, self.rank, tensor.device)
        return tensor.index_select(dim, index)

    def key_positions(self, local_len: int, device: torch.device) -> Tensor:
        """``[S]`` global positions of the all-gathered keys, in the gather's (rank) order."""
        seq = local_len * self.size
        return torch.cat([rank_positions(seq, self.size, r, device) for r in range(self.size)])

    def pin(self, model: nn.Module) -> None:
        """Make every attention module of ``model`` use this rank's context-parallel kernel (no-op at CP 1)."""
        if not self.enabled:
            return
        for module in model.modules():
            if hasattr(module, "kernel") and hasattr(module, "n_kv_heads"):
                module.kernel = self.kernel


def local_block_backend(device: torch.device) -> str:
    """The kernel of a CP rank's local attention block on ``device``: ``"flex"`` (FlexAttention with a block
    mask) on CUDA where this torch has it and ``LLAMA_FLEX_ATTENTION`` is not 0, else ``"sdpa"`` (SDPA with one
    additive mask per forward). On the CPU torch 2.13 runs FlexAttention's forward only, so training stays on
    SDPA there; ``flex_local_block`` is still called directly on CPU by the tests."""
    return "flex" if device.type == "cuda" and flex_attention.available() else "sdpa"


def local_block_mask_mod(q_pos: Tensor, k_pos: Tensor, q_docs: Tensor | None, k_docs: Tensor | None) -> Any:
    """``mask_mod(b, h, q, kv)`` of the CP local block: the key at or before the query's global position, and
    with document ids in the query's document."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = k_pos[kv_idx] <= q_pos[q_idx]
        if q_docs is not None and k_docs is not None:
            allowed = allowed & (q_docs[b, q_idx] == k_docs[b, kv_idx])
        return allowed

    return mask_mod


def flex_local_block(q: Tensor, k_all: Tensor, v_all: Tensor, block_mask: Any, *, compiled: bool | None = None) -> Tensor:
    """FlexAttention of the local queries ``q [b, S/cp, heads, d]`` over the gathered ``k_all``/``v_all``
    ``[b, S, kv_heads, d]`` under ``block_mask`` (``local_block_mask``)."""
    return flex_attention.flex_document_attention(q, k_all, v_all, block_mask, compiled=compiled)


def local_block_mask(q_pos: Tensor, k_pos: Tensor, q_docs: Tensor | None, k_docs: Tensor | None, *, batch: int,
                     compiled: bool | None = None) -> Any:
    """The FlexAttention ``BlockMask`` of the local block (compiled on CUDA: no ``S/cp x S`` tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    use_compiled = q_pos.is_cuda if compiled is None else compiled
    build = flex_attention._compiled("create_block_mask") if use_compiled else create_block_mask
    return build(local_block_mask_mod(q_pos, k_pos, q_docs, k_docs), B=batch if q_docs is not None else None,
                 H=None, Q_LEN=q_pos.numel(), KV_LEN=k_pos.numel(), device=q_pos.device,
                 BLOCK_SIZE=flex_attention.BLOCK)


class ContextParallelAttention:
    """Attention of this rank's queries against the whole sequence's keys/values (all-gathered over CP)."""

    name = "context_parallel"

    def __init__(self, cp: ContextParallel) -> None:
        self.cp = cp

    def applies(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> bool:
        return not mask.with_cache

    def visible(self, mask: AttentionMask, local_len: int, device: torch.device) -> Tensor:
        """Boolean ``[b or 1, 1, S/cp, S]``: a local query sees a gathered key at or before its global position
        and, with document ids, in its own document (collective: gathers the document ids over CP)."""
        q_pos = rank_positions(local_len * self.cp.size, self.cp.size, self.cp.rank, device)
        k_pos = self.cp.key_positions(local_len, device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None]
        if mask.document_ids is not None:
            local = mask.document_ids
            gathered = torch.cat(comm.all_gather(local.contiguous(), group=self.cp.group), dim=1) \
                if self.cp.enabled else local
            allowed = allowed & (local[:, :, None] == gathered[:, None, :])
        return allowed.unsqueeze(1)

    def block_mask(self, mask: AttentionMask, q: Tensor) -> Any:
        """``visible`` as a FlexAttention block mask (collective like it: gathers the document ids over CP)."""
        local_len = q.shape[1]
        q_pos = rank_positions(local_len * self.cp.size, self.cp.size, self.cp.rank, q.device)
        k_pos = self.cp.key_positions(local_len, q.device)
        q_docs = k_docs = mask.document_ids
        if q_docs is not None and self.cp.enabled:
            k_docs = torch.cat(comm.all_gather(q_docs.contiguous(), group=self.cp.group), dim=1)
        return local_block_mask(q_pos, k_pos, q_docs, k_docs, batch=q.shape[0])

    def additive_mask(self, mask: AttentionMask, q: Tensor) -> Tensor:
        """``visible`` as a 0 / -inf bias in the queries' dtype, built once per forward: SDPA would convert a
        boolean mask into such a bias in every block and keep each copy for backward (2 bytes x S per local
        token per block), this one is shared by all blocks."""
        allowed = self.visible(mask, q.shape[1], q.device)
        return torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        if mask.with_cache:
            raise ValueError("context parallelism runs training and scoring forwards; generate with CP 1")
        k_all, v_all = k, v
        if self.cp.enabled:  # (a None group would mean every rank to model.comm)
            k_all = comm.gather_along_dim(k, dim=1, group=self.cp.group)
            v_all = comm.gather_along_dim(v, dim=1, group=self.cp.group)
        if local_block_backend(q.device) == "flex":
            block_mask = mask.memo("context_parallel_flex", lambda: self.block_mask(mask, q))
            return flex_local_block(q, k_all, v_all, block_mask)
        bias = mask.memo("context_parallel", lambda: self.additive_mask(mask, q))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                             attn_mask=bias, enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)
