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
(``model.comm.gather_along_dim``). On the CPU the local block runs ``scaled_dot_product_attention`` with a
boolean ``[b, 1, S/cp, S]`` mask built once per forward (``AttentionMask.memo``); on GPUs the same call runs
SDPA's memory-efficient kernel with that mask (a FlexAttention block mask is the next step, not done).

Weights are replicated over CP: each rank's loss covers its own tokens, and the gradients are summed over the
CP group together with the data-parallel group (the trainer's reduction spans DP x CP). Checkpoints do not see
CP at all. Generation (a KV cache) runs with CP 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import comm
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
        bias = mask.memo("context_parallel", lambda: self.additive_mask(mask, q))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                             attn_mask=bias, enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)
