"""The context-parallel local block on FlexAttention (``model/context_parallel.py``): the GPU backend, checked
where the CPU can (torch 2.13 runs FlexAttention's forward on CPU, eager; no backward).

- ``local_block_backend``: FlexAttention on CUDA where this torch has it, SDPA elsewhere or with
  ``LLAMA_FLEX_ATTENTION=0`` (the same switch as the non-CP path).
- Every CP rank's local block (its two chunks' queries against all keys in the CP gather's rank order) under the
  FlexAttention block mask equals the dense-mask attention of the whole sequence at those rows (fp32, 1e-5),
  with documents crossing the chunk boundaries and the 128-token tiles, CP 2 and CP 4, grouped-query heads.
- ``ContextParallelAttention`` routes to FlexAttention when the backend says so and gives SDPA's result.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from model import flex_attention
from model.attention import AttentionMask
from model.context_parallel import (
    ContextParallel,
    flex_local_block,
    local_block_backend,
    local_block_mask,
    rank_positions,
)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not flex_attention.available(), reason="this torch has no FlexAttention")]


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
    s = q.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None]
    if docs is not None:
        mask = mask & (docs[:, :, None] == docs[:, None, :])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def test_backend_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert local_block_backend(torch.device("cuda", 0)) == "flex"
    assert local_block_backend(torch.device("cpu")) == "sdpa"
    monkeypatch.setenv("LLAMA_FLEX_ATTENTION", "0")
    assert local_block_backend(torch.device("cuda", 0)) == "sdpa"


# (2, 512): 128-token chunks, tiles full / empty / partial; (4, 256): 32-token chunks inside one tile; (2, 72):
# a sequence shorter than one tile. Without documents: the plain causal mask over the gathered keys.
@pytest.mark.parametrize("cp,s,documents", [(2, 512, True), (4, 256, True), (2, 72, True), (4, 256, False)])
def test_each_ranks_flex_block_equals_the_dense_rows(cp: int, s: int, documents: bool) -> None:
    torch.manual_seed(0)
    b, heads, kv_heads, d = 2, 4, 2, 16
    q, k, v = torch.randn(b, s, heads, d), torch.randn(b, s, kv_heads, d), torch.randn(b, s, kv_heads, d)
    # ~every 40 tokens a new document: boundaries inside chunks, across chunk edges and inside tiles.
    docs = torch.cumsum((torch.rand(b, s, generator=torch.Generator().manual_seed(3)) < 0.025).long(), 1) \
        if documents else None
    reference = _dense(q, k, v, docs)
    gather = torch.cat([rank_positions(s, cp, r) for r in range(cp)])  # the all-gather's order of the keys
    k_all, v_all = k[:, gather], v[:, gather]
    for rank in range(cp):
        mine = rank_positions(s, cp, rank)
        q_docs = docs[:, mine] if docs is not None else None
        k_docs = docs[:, gather] if docs is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention on CPU says it is for debugging
            block_mask = local_block_mask(mine, gather, q_docs, k_docs, batch=b, compiled=False)
            out = flex_local_block(q[:, mine], k_all, v_all, block_mask, compiled=False)
        assert (out - reference[:, mine]).abs().max() <= 1e-5, (cp, rank)


def test_cp_kernel_routes_to_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel itself (CP 1 here: one process) takes the FlexAttention path when the backend is "flex"."""
    import model.context_parallel as context_parallel

    torch.manual_seed(1)
    b, s, heads, kv_heads, d = 2, 256, 4, 2, 16
    q, k, v = torch.randn(b, s, heads, d), torch.randn(b, s, kv_heads, d), torch.randn(b, s, kv_heads, d)
    docs = torch.cumsum((torch.rand(b, s) < 0.03).long(), 1)
    kernel = ContextParallel(None).kernel
    sdpa = kernel(q, k, v, AttentionMask(document_ids=docs))
    calls = []
    real = context_parallel.flex_local_block

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(context_parallel, "local_block_backend", lambda device: "flex")
    monkeypatch.setattr(context_parallel, "flex_local_block", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = kernel(q, k, v, AttentionMask(document_ids=docs))
    assert calls and (flex - sdpa).abs().max() <= 1e-5
    assert (sdpa - _dense(q, k, v, docs)).abs().max() <= 1e-5
