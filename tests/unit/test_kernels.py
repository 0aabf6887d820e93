"""The fused CPU path (model/kernels): every Function against the eager formula it replaces, forward and
backward; the whole model fused vs eager; a corrupted kernel cache is rebuilt. Needs the kernels built (a C
compiler): skips without one, fails under CI=true (``tests/conftest.py``). The fallbacks that need no compiler
(no compiler, switched off) are in ``test_kernels_fallback.py`` and run everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.attention import document_causal_mask
from model.config import get_config
from model.llama import Llama, init_llama_weights
from model.rope import apply_rotary, rope_inverse_frequencies

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fused_cpu_kernels")]
REPO = Path(__file__).resolve().parents[2]


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-6) -> None:
    """Equal to float rounding: max |difference| <= rel * max |expected|."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item() or 1.0
    assert (actual - expected).abs().max().item() <= rel * scale, (actual - expected).abs().max().item() / scale


def _grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


@pytest.mark.parametrize("shape", [(3, 17, 64), (2, 5, 33), (7, 3)])
def test_rms_norm_matches_eager(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    dy = torch.randn(shape)
    fused = kernels.rms_norm(x, w, 1e-5)
    eager = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    _close(fused, eager)
    for a, b in zip(_grads(fused, [x, w], dy), _grads(eager, [x, w], dy)):
        _close(a, b)
    frozen = w.detach()  # a frozen norm (reference / reward models): no weight gradient, same input gradient
    (gx,) = _grads(kernels.rms_norm(x, frozen, 1e-5), [x], dy)
    _close(gx, _grads(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * frozen, [x], dy)[0])


def test_linear_matches_f_linear() -> None:
    torch.manual_seed(0)
    x, w, dy = torch.randn(3, 19, 40, requires_grad=True), torch.randn(24, 40, requires_grad=True), torch.randn(3, 19, 24)
    fused, eager = kernels.linear(x, w), F.linear(x, w)
    _close(fused, eager)
    for a, b in zip(_grads(fused, [x, w], dy), _grads(eager, [x, w], dy)):
        _close(a, b)


def test_gate_up_silu_matches_eager_including_extremes() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    w1, w3 = torch.randn(48, 32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
    with torch.no_grad():
        w1[:4] *= 60  # gate pre-activations far into both tails of the sigmoid (|g| up to ~1000)
    dh = torch.randn(2, 9, 48)
    fused = kernels.gate_up_silu(x, w1, w3)
    eager = F.silu(F.linear(x, w1)) * F.linear(x, w3)
    assert torch.isfinite(fused).all()
    _close(fused, eager)
    for a, b in zip(_grads(fused, [x, w1, w3], dh), _grads(eager, [x, w1, w3], dh)):
        _close(a, b, rel=5e-6)
    poisoned = x.detach().clone()
    poisoned[0, 3, 0] = float("nan")  # NaN must reach the loss (the health check skips such steps)
    assert torch.isnan(kernels.gate_up_silu(poisoned, w1, w3)[0, 3]).all()


def test_reused_concatenations_are_exact_and_follow_in_place_updates() -> None:
    torch.manual_seed(0)
    x, w1, w3 = torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(24, 16)
    expected = kernels.gate_up_silu(x, w1, w3)
    with torch.no_grad(), kernels.reused_concatenations():
        first = kernels._concatenated(w1, w3)
        assert kernels._concatenated(w1, w3) is first  # reused, not copied again
        assert torch.equal(kernels.gate_up_silu(x, w1, w3), expected)
        w1.mul_(2.0)  # an in-place update (a training step) between two forwards: a new concatenation
        assert torch.equal(kernels._concatenated(w1, w3)[:24], w1)
        assert torch.allclose(kernels.gate_up_silu(x, w1, w3), F.silu(x @ w1.t()) * (x @ w3.t()), atol=1e-5)
    with kernels.reused_concatenations():  # autograd on: never cached (the graph owns its weight)
        assert kernels._concatenated(w1, w3) is not kernels._concatenated(w1, w3)
    assert kernels._concat_cache is None  # released on exit


@pytest.mark.parametrize("position_rows", [1, 3])
def test_qkv_rotary_matches_eager(position_rows: int) -> None:
    torch.manual_seed(0)
    b, s, dim, heads, kv_heads, d = 3, 11, 48, 4, 2, 16
    x = torch.randn(b, s, dim, requires_grad=True)
    wq, wk, wv = (torch.randn(n * d, dim, requires_grad=True) for n in (heads, kv_heads, kv_heads))
    positions = torch.stack([torch.arange(s) + 7 * i for i in range(position_rows)])
    angles = positions[..., None].float() * rope_inverse_frequencies(d, 10000.0, None)
    cos, sin = angles.cos(), angles.sin()
    fused = kernels.qkv_rotary(x, wq, wk, wv, cos, sin, heads=heads, kv_heads=kv_heads, head_dim=d)
    rope = (cos[:, :, None], sin[:, :, None])
    eager = (apply_rotary(F.linear(x, wq).view(b, s, heads, d), *rope),
             apply_rotary(F.linear(x, wk).view(b, s, kv_heads, d), *rope), F.linear(x, wv).view(b, s, kv_heads, d))
    for a, e in zip(fused, eager):
        _close(a, e)
    # Gradients in the strided layouts attention hands back ([b, heads, s, d] memory seen as [b, s, heads, d]).
    grads = [torch.randn(b, n, s, d).transpose(1, 2) for n in (heads, kv_heads, kv_heads)]
    for a, e in zip(_grads(fused, [x, wq, wk, wv], grads), _grads(eager, [x, wq, wk, wv], grads)):
        _close(a, e)


@pytest.mark.parametrize("b,s,heads,kv_heads,d", [(2, 300, 4, 2, 16), (3, 128, 2, 2, 8), (1, 5, 4, 1, 8),
                                                  (2, 257, 6, 3, 32)])
@pytest.mark.parametrize("documents", [False, True])
def test_causal_attention_matches_sdpa(b: int, s: int, heads: int, kv_heads: int, d: int, documents: bool) -> None:
    torch.manual_seed(0)
    q = torch.randn(b, s, heads, d, requires_grad=True)
    k, v = (torch.randn(b, s, kv_heads, d, requires_grad=True) for _ in range(2))
    mask = None
    if documents:
        mask = document_causal_mask(torch.cumsum((torch.rand(b, s) < 0.03).long(), dim=1))
    dout = torch.randn(b, s, heads, d)
    fused = kernels.causal_attention(q, k, v, mask)
    eager = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=True).transpose(1, 2)
    _close(fused, eager)
    for a, e in zip(_grads(fused, [q, k, v], dout), _grads(eager, [q, k, v], dout)):
        _close(a, e)


def test_attention_block_plan() -> None:
    assert kernels.ATTENTION_BLOCK == 64
    assert kernels.attention_blocks(150) == [(0, 64), (64, 128), (128, 150)]
    assert kernels.attention_keys_per_query(150) == (64 * 64 + 64 * 128 + 22 * 150) / 150


def _model_grads(model: Llama, tokens: torch.Tensor, documents: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(tokens, document_ids=documents)
    F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("documents", [False, True])
def test_model_fused_equals_eager(documents: bool) -> None:
    """The whole model, forward and every parameter gradient, fused vs ``kernels.disabled()``; and activation
    checkpointing on the fused path gives the very same numbers as without it."""
    cfg = get_config("debug_tiny")
    model = Llama(cfg)
    init_llama_weights(model, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    docs = torch.cumsum((torch.rand(2, 150, generator=torch.Generator().manual_seed(1)) < 0.02).long(), 1)
    docs = docs if documents else None
    fused_logits, fused_grads = _model_grads(model, tokens, docs)
    with kernels.disabled():
        assert not kernels.applies(tokens.float())
        eager_logits, eager_grads = _model_grads(model, tokens, docs)
    _close(fused_logits, eager_logits)
    for name in eager_grads:
        _close(fused_grads[name], eager_grads[name], rel=1e-5)
    model.checkpoint_every = 1
    model.train()
    again_logits, again_grads = _model_grads(model, tokens, docs)
    assert torch.equal(again_logits, fused_logits)
    assert all(torch.equal(again_grads[n], fused_grads[n]) for n in fused_grads)


def test_one_openmp_runtime_in_the_process() -> None:
    """Loading the library maps no OpenMP runtime besides torch's (it shares torch's thread pool). Other
    packages may bring their own renamed copies (sentencepiece does); only what the library adds counts."""
    done = _run("""
        from pathlib import Path
        import torch
        def gomps():
            return {l.split()[-1] for l in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in l}
        before = gomps()
        from model.kernels import build
        assert build.load() is not None, build.last_error
        print("ADDED", sorted(gomps() - before), "TORCH", any("torch" in p for p in before))
    """, {})
    assert "ADDED [] TORCH True" in done.stdout, done.stdout + done.stderr


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=100)


CHECK = """
    import torch
    from model import kernels
    from model.config import get_config
    from model.llama import Llama
    model = Llama(get_config("debug_tiny"))
    out = model(torch.randint(0, 512, (1, 16)))
    print("ENABLED", kernels.enabled(), "SHAPE", tuple(out.shape))
"""


def test_corrupted_cache_is_rebuilt(tmp_path: Path) -> None:
    first = _run(CHECK, {"LLAMA_KERNEL_CACHE": str(tmp_path)})
    assert "ENABLED True" in first.stdout, first.stdout + first.stderr
    (library,) = tmp_path.glob("cpu_kernels-*.so")
    library.write_bytes(b"not a shared library")  # e.g. a node died while another one published it
    again = _run(CHECK, {"LLAMA_KERNEL_CACHE": str(tmp_path)})
    assert "ENABLED True" in again.stdout, again.stdout + again.stderr
    assert library.read_bytes()[:4] == b"\x7fELF"  # rebuilt in place
