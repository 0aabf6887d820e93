"""The per-call choice of attention kernel and projection path (model/attention.py, model/projections.py), and
that a new attention kernel plugs in without touching the block: registered or pinned on one module."""

from __future__ import annotations

import pytest
import torch

from model import attention, kernels
from model.attention import AttentionMask, SDPAAttention, choose_kernel, register_kernel
from model.config import get_config
from model.llama import KVCache, Llama, init_llama_weights
from model.projections import choose_path

pytestmark = pytest.mark.timeout(120)


def _model() -> Llama:
    model = Llama(get_config("debug_tiny"))
    init_llama_weights(model, seed=5)
    return model


def _qkv(seq: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    q = torch.randn(2, seq, 4, 8, dtype=dtype)
    k = torch.randn(2, seq, 2, 8, dtype=dtype)
    return q, k, k.clone()


class RecordingKernel(SDPAAttention):
    """SDPA that counts its calls: what a new backend (flex, ring attention) looks like to the block."""

    name = "recording"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, q, k, v, mask):  # type: ignore[override]
        self.calls += 1
        return super().__call__(q, k, v, mask)


def test_kernel_choice_per_call() -> None:
    q, k, v = _qkv(16)
    training = AttentionMask()
    with_cache = AttentionMask(with_cache=True, causal=True)
    expected = "fused_cpu" if kernels.enabled() else "sdpa"
    assert choose_kernel(q, k, v, training).name == expected
    assert choose_kernel(q, k, v, with_cache).name == "sdpa"  # generation keeps SDPA (prefill and decode)
    assert choose_kernel(*_qkv(16, torch.bfloat16), training).name == "sdpa"
    assert choose_kernel(*_qkv(1), training).name == "sdpa"
    with kernels.disabled():
        assert choose_kernel(q, k, v, training).name == "sdpa"


def test_projection_path_per_call() -> None:
    model = _model()
    a, f = model.layers[0].attention, model.layers[0].feed_forward
    x = torch.randn(2, 16, model.config.dim)
    fused = "fused_cpu" if kernels.enabled() else "fused_gemm"
    assert choose_path((a.wq, a.wk, a.wv), x, None) == fused
    assert choose_path((f.w1, f.w3), x, None) == fused
    assert choose_path((a.wq, a.wk, a.wv), x[:, :1], None) == "separate"
    assert choose_path((a.wq, a.wk, a.wv), x.bfloat16(), None) == "fused_gemm"
    with kernels.disabled():
        assert choose_path((f.w1, f.w3), x, None) == "fused_gemm"
    assert choose_path((a.wq, a.wk, a.wv), x[:, :1], object()) == "packed_decode"


@pytest.mark.parametrize("documents", [False, True])
def test_registered_kernel_runs_in_every_block(documents: bool) -> None:
    model = _model()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    docs = torch.cumsum((torch.rand(2, 24, generator=torch.Generator().manual_seed(1)) < 0.1).long(), 1)
    docs = docs if documents else None
    with kernels.disabled():
        expected = model(tokens, document_ids=docs)
    recording = RecordingKernel()
    saved = list(attention.KERNELS)
    try:
        register_kernel(recording, before="fused_cpu")
        assert [k.name for k in attention.KERNELS][:2] == ["recording", "fused_cpu"]
        got = model(tokens, document_ids=docs)
    finally:
        attention.KERNELS[:] = saved
    assert recording.calls == model.config.n_layers
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_pinned_kernel_on_one_module_and_mask_built_once() -> None:
    model = _model()
    recording = RecordingKernel()
    model.layers[1].attention.kernel = recording
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7])
    built = []
    original = attention.document_causal_mask
    attention.document_causal_mask = lambda ids: built.append(1) or original(ids)
    try:
        with kernels.disabled():
            model(tokens, document_ids=docs)
    finally:
        attention.document_causal_mask = original
    assert recording.calls == 1
    assert len(built) == 1  # one dense mask per forward, shared by every block


def test_cache_update_and_decode_match_full_forward() -> None:
    """Prefill + one-token steps through ``KVCache.update`` equal the logits of one full forward."""
    model = _model().eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.allocate(model, batch=2, max_len=10)
        steps = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)
    assert cache.length == 10
