"""Prepacked decode weights (``model/prepack.py``): same logits as the plain path, and only where eligible."""

from __future__ import annotations

import pytest
import torch

from model import prepack
from model.config import get_config
from model.generate import generate
from model.llama import KVCache, Llama, init_llama_weights

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN linear ops")]


def _model(name: str = "debug_tiny") -> Llama:
    model = Llama(get_config(name))
    init_llama_weights(model, seed=3)
    return model.eval()


def _decode_logits(model: Llama, *, prepack_weights: bool, steps: int = 5) -> torch.Tensor:
    tokens = torch.tensor([[1, 7, 9, 30], [1, 2, 3, 4]])
    cache = KVCache.allocate(model, batch=2, max_len=16, prepack_weights=prepack_weights)
    assert (cache.packed is not None) == prepack_weights
    out = []
    with torch.inference_mode():
        hidden = model(tokens, cache=cache, return_hidden=True)
        for _ in range(steps):
            nxt = model.output(hidden[:, -1]).argmax(-1, keepdim=True)
            hidden = model(nxt, cache=cache, return_hidden=True)
            head = cache.packed.output_logits if cache.packed is not None else model.output
            out.append(head(hidden[:, -1]))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["debug_tiny", "debug_llama2_tiny", "debug_llama3_tiny"])
def test_packed_decode_matches_plain_linear(name: str) -> None:
    model = _model(name)
    packed, plain = _decode_logits(model, prepack_weights=True), _decode_logits(model, prepack_weights=False)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_only_eligible_models_are_packed() -> None:
    model = _model()
    assert prepack.pack_for_decode(model, batch=2) is not None
    assert prepack.pack_for_decode(model.to(torch.bfloat16), batch=2) is None  # fp32 only
    assert prepack.pack_for_decode(object(), batch=2) is None  # not a Llama (e.g. a ZeRO-3 engine stepper)


def test_packed_weights_only_for_no_grad_single_token_steps() -> None:
    cache = KVCache.allocate(_model(), batch=1, max_len=8)
    assert cache.packed is not None
    assert cache.packed_block(0, seq=1) is None  # autograd on: the packed op has no backward
    with torch.no_grad():
        assert cache.packed_block(0, seq=1) is not None
        assert cache.packed_block(0, seq=2) is None  # prefill keeps F.linear


def test_generate_output_unchanged_by_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    prompts = [[1, 5, 9, 33], [1, 44]]
    got = generate(model, prompts, max_new_tokens=10)
    original = KVCache.allocate.__func__

    def unpacked(cls: type, *args: object, **kwargs: object) -> KVCache:
        return original(cls, *args, **{**kwargs, "prepack_weights": False})

    monkeypatch.setattr(KVCache, "allocate", classmethod(unpacked))
    assert generate(model, prompts, max_new_tokens=10) == got
