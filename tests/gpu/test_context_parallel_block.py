"""One context-parallel attention step at 32K tokens on the GPU (issue 22): every CP rank's local block on the
FlexAttention backend (``model/context_parallel.py``: ``local_block_backend`` picks it on CUDA) equals the dense
reference within bf16 tolerance, forward and backward.

CP 4 is simulated in one process: rank r's queries are its two chunks (``rank_positions``), its keys/values the
whole sequence in the CP all-gather's rank order, the mask the document mask with global positions. The sum
over ranks of each block's ``<out, dy>`` is the whole sequence's, so the gradients of q, k and v summed over the
ranks must equal the reference's (that sum is what the CP backward's reduce-scatter of dK/dV computes).
Reference: SDPA with the dense boolean document mask in fp32, 4,096 query rows at a time (exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.context_parallel import flex_local_block, local_block_backend, local_block_mask, rank_positions

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_cp4_flex_blocks_at_32k_equal_the_dense_reference(cuda_only: torch.device) -> None:
    assert local_block_backend(cuda_only) == "flex"
    torch.manual_seed(0)
    s, cp, heads, kv_heads, d = 32768, 4, 8, 2, 64
    q32 = torch.randn(1, s, heads, d, device=cuda_only)
    k32, v32 = torch.randn(1, s, kv_heads, d, device=cuda_only), torch.randn(1, s, kv_heads, d, device=cuda_only)
    docs = torch.cumsum((torch.rand(1, s, device=cuda_only) < 1 / 3000).long(), 1)  # ~11 documents
    dy = torch.randn(1, s, heads, d, device=cuda_only)

    ref_in = [t.clone().requires_grad_() for t in (q32, k32, v32)]
    ref = torch.empty_like(q32)
    rows = 4096  # the dense reference by query rows (exact): a [heads, 4096, S] fp32 score block at most
    for start in range(0, s, rows):
        pos = torch.arange(start, start + rows, device=cuda_only)
        mask = (torch.arange(s, device=cuda_only)[None] <= pos[:, None]) & (docs[0, pos, None] == docs[0, None, :])
        part = F.scaled_dot_product_attention(ref_in[0][:, pos].transpose(1, 2), ref_in[1].transpose(1, 2),
                                              ref_in[2].transpose(1, 2), attn_mask=mask[None, None],
                                              enable_gqa=True).transpose(1, 2)
        (part * dy[:, pos]).sum().backward()
        ref[:, pos] = part.detach()

    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q32, k32, v32))
    gather = torch.cat([rank_positions(s, cp, r, cuda_only) for r in range(cp)])
    out = torch.empty_like(ref)
    for rank in range(cp):
        mine = rank_positions(s, cp, rank, cuda_only)
        block_mask = local_block_mask(mine, gather, docs[:, mine], docs[:, gather], batch=1)
        local = flex_local_block(q[:, mine], k[:, gather], v[:, gather], block_mask)
        (local.float() * dy[:, mine]).sum().backward()
        out[:, mine] = local.detach().float()
    assert _rel(out, ref) <= 3e-2
    for name, ours, theirs in zip("qkv", (q, k, v), ref_in):
        assert _rel(ours.grad, theirs.grad) <= 6e-2, name
