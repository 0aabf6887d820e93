"""The planner's per-block activation bytes and FLOPs are what the model's GPU path really keeps and computes.

The GPU path is the eager formulas with one GEMM per projection (``model.projections`` picks ``separate`` on
GPUs; forced here on the CPU) and attention that keeps only its output and logsumexp (flash, or FlexAttention
with the document mask: ``tests/gpu`` measures that one on the GPU). Measured on one bf16 block with
``torch.autograd.graph.saved_tensors_hooks`` (every tensor autograd keeps for backward, by storage, minus the
parameters, the block input and the RoPE tables that all blocks share) and with
``torch.utils.flop_counter.FlopCounterMode``. Both must equal ``launch.planner`` exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launch.planner import Layout, activation_bytes_per_token, block_params
from model import kernels, projections
from model.config import get_config, model_flops_per_token
from model.llama import Llama, init_llama_weights

pytestmark = pytest.mark.timeout(120)


def _block(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(projections, "choose_path", lambda *args: "separate")  # the GPU path's projections
    cfg = get_config(name)
    model = Llama(cfg)
    init_llama_weights(model, seed=0)
    return cfg, model.to(dtype)


@pytest.mark.parametrize("name", ["debug_llama3_tiny", "bench_25m"])
def test_saved_activations_equal_the_planner(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, model = _block(name, torch.bfloat16, monkeypatch)
    b, s = 2, 256
    x = torch.randn(b, s, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    rope = model.rotary(torch.arange(s)[None].expand(b, s))
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared |= {t.untyped_storage().data_ptr() for t in (x, *rope)}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    # Plain causal attention: SDPA's CPU flash kernel, which (like flash and FlexAttention on GPUs) keeps the
    # output and the logsumexp, not the s x s probabilities.
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.layers[0](x, rope)
    planned = activation_bytes_per_token(cfg, Layout(flash_attention=True, fused_norm=False), s)
    assert sum(saved.values()) / (b * s) == planned


@pytest.mark.parametrize("name", ["debug_llama3_tiny", "bench_25m"])
def test_block_flops_equal_the_planner(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FlopCounterMode counts every matmul of forward + backward. SDPA's math kernel computes the full s x s
    square, which is the planner's attention term with ``causal=False``; flash and FlexAttention skip the
    upper triangle, the half that ``model_flops_per_token`` (causal) counts."""
    cfg, model = _block(name, torch.float32, monkeypatch)
    b, s = 2, 128
    x = torch.randn(b, s, cfg.dim, requires_grad=True)
    rope = model.rotary(torch.arange(s)[None].expand(b, s))
    with kernels.disabled(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.layers[0](x, rope).sum().backward()
    per_token = counter.get_total_flops() / (b * s)
    linear, attention_full = 6 * block_params(cfg, 1)[0], 12 * cfg.dim * s
    assert per_token == linear + attention_full
    per_block_causal = (model_flops_per_token(cfg, s) - model_flops_per_token(cfg, s, causal=False)) / cfg.n_layers
    assert per_block_causal == -attention_full / 2  # the model FLOPs keep exactly the causal half
