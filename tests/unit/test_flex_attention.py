"""FlexAttention with a document block mask equals SDPA with the dense document mask (fp32, within 1e-5).

On the CPU torch 2.13 runs FlexAttention's forward only (eager; no backward), so this checks the forward here;
the GPU tests train through it (``tests/gpu/test_train_step.py``). Shapes include grouped-query heads,
sequences that are not a multiple of the 128-token tile, document edges on tile edges, one-token documents
and a single document (plain causal).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model import flex_attention
from model.flex_attention import FlexDocumentAttention, document_block_mask, flex_document_attention

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not flex_attention.available(), reason="this torch has no FlexAttention")]


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    s = q.shape[1]
    mask = (torch.ones(s, s, dtype=torch.bool).tril()[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def _documents(kind: str, b: int, s: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "random":
        return torch.cumsum((torch.rand(b, s, generator=gen) < 0.03).long(), 1)
    if kind == "tile_edges":  # every document boundary on a 128-token tile boundary: full and empty tiles
        return (torch.arange(s) // 128).expand(b, s).contiguous()
    if kind == "one_token_docs":
        return torch.cumsum((torch.rand(b, s, generator=gen) < 0.5).long(), 1)
    return torch.zeros(b, s, dtype=torch.long)  # one document: plain causal


@pytest.mark.parametrize("b,s,heads,kv_heads,d", [(2, 300, 4, 2, 16), (1, 256, 2, 2, 32), (3, 77, 4, 1, 16)])
@pytest.mark.parametrize("kind", ["random", "tile_edges", "one_token_docs", "single"])
def test_block_mask_equals_the_dense_mask(b: int, s: int, heads: int, kv_heads: int, d: int, kind: str) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(b, s, heads, d), torch.randn(b, s, kv_heads, d), torch.randn(b, s, kv_heads, d)
    docs = _documents(kind, b, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is for debugging: it is, here
        out = flex_document_attention(q, k, v, document_block_mask(docs))
    expected = _dense_reference(q, k, v, docs)
    assert (out - expected).abs().max().item() <= 1e-5


def test_block_mask_is_blocks_not_a_dense_mask() -> None:
    """The block mask holds per-tile counts and indices: O((s/128)^2) per row, not s^2 booleans."""
    docs = (torch.arange(1024) // 300).expand(2, 1024).contiguous()
    mask = document_block_mask(docs)
    stored = sum(t.numel() for t in (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                     mask.full_kv_indices) if t is not None)
    tiles = 1024 // 128
    assert stored <= 2 * 2 * (tiles + tiles**2)  # (partial + full) x (counts + indices) per batch row
    assert mask.sparsity() > 50  # tiles above the diagonal and across documents are skipped


def test_chosen_only_for_cuda_training_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FlexDocumentAttention()
    q = torch.randn(1, 8, 2, 16)
    docs = torch.zeros(1, 8, dtype=torch.long)
    mask = SimpleNamespace(document_ids=docs, with_cache=False)
    assert not kernel.applies(q, q, q, mask)  # CPU: no backward there, the CPU kernels run instead
    cuda_q = SimpleNamespace(is_cuda=True, shape=q.shape)
    assert kernel.applies(cuda_q, cuda_q, cuda_q, mask)
    assert not kernel.applies(cuda_q, cuda_q, cuda_q, SimpleNamespace(document_ids=None, with_cache=False))
    assert not kernel.applies(cuda_q, cuda_q, cuda_q, SimpleNamespace(document_ids=docs, with_cache=True))
    monkeypatch.setenv("LLAMA_FLEX_ATTENTION", "0")
    assert not kernel.applies(cuda_q, cuda_q, cuda_q, mask)


def test_registered_between_the_cpu_kernels_and_sdpa() -> None:
    from model.attention import KERNELS

    assert [k.name for k in KERNELS] == ["fused_cpu", "flex_document", "sdpa"]


@pytest.mark.parametrize("name", ["debug_tiny", "debug_llama3_tiny"])
def test_whole_model_with_flex_equals_the_dense_mask(name: str) -> None:
    """Every block pinned to FlexAttention (as on a GPU) vs the CPU's own choice with the dense document mask."""
    from model.config import get_config
    from model.llama import Llama, init_llama_weights

    cfg = get_config(name)
    model = Llama(cfg)
    init_llama_weights(model, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    docs = _documents("random", 2, 150)
    with torch.no_grad():
        expected = model(tokens, document_ids=docs)
        for block in model.layers:
            block.attention.kernel = FlexDocumentAttention()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex = model(tokens, document_ids=docs)
    assert (flex - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
