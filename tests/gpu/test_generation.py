"""KV-cache generation on the GPU equals the no-cache forward: logits step by step, greedy tokens exactly.

fp32 (TF32 off): relative gap <= 1e-4 of the largest logit (the cached and the full forward reduce in another
order). bf16: <= 3e-2 (bf16 keeps 8 bits of mantissa; the logits pass through 2 blocks of bf16 matmuls).
"""

from __future__ import annotations

import pytest
import torch

from model.config import get_config
from model.generate import generate
from model.llama import KVCache, Llama, init_llama_weights

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]


def _model(device: torch.device, dtype: torch.dtype) -> Llama:
    model = Llama(get_config("debug_llama3_tiny"))
    init_llama_weights(model, seed=0)
    return model.to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cached_logits_equal_full_forward(cuda: torch.device, dtype: torch.dtype, tolerance: float) -> None:
    model = _model(cuda, dtype)
    tokens = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(cuda)
    prefill = 9
    with torch.inference_mode():
        full = model(tokens).float()
        cache = KVCache.allocate(model, batch=2, max_len=tokens.shape[1])
        stepped = [model(tokens[:, :prefill], cache=cache).float()]
        for t in range(prefill, tokens.shape[1]):
            stepped.append(model(tokens[:, t : t + 1], cache=cache).float())
    cached = torch.cat(stepped, dim=1)
    gap = ((cached - full).abs().max() / full.abs().max()).item()
    assert gap <= tolerance, (dtype, gap)


def test_greedy_generation_equals_no_cache_recomputation(cuda: torch.device) -> None:
    model = _model(cuda, torch.float32)
    prompts = [[1, 17, 33, 5], [1, 9]]  # different lengths: left padding and per-row positions are used
    out = generate(model, prompts, max_new_tokens=20, temperature=0.0)
    with torch.inference_mode():
        for prompt, new in zip(prompts, out):
            tokens = list(prompt)
            for _ in range(len(new)):
                logits = model(torch.tensor([tokens], device=cuda))[0, -1]
                tokens.append(int(logits.argmax()))
            assert tokens[len(prompt):] == new
