"""The fast CPU path of the Llama block: fused C kernels and oneDNN GEMMs behind autograd Functions.

    from model import kernels
    if kernels.applies(x, weight):
        y = kernels.rms_norm(x, weight, eps)

What runs where (fp32 tensors on the CPU only; everything else keeps the eager formulas of ``model/llama.py``):

- ``rms_norm``: one pass forward, one backward (``cpu_kernels.c``) instead of the ~10 broadcast operators
  autograd records for ``x * rsqrt(mean(x^2) + eps) * w``.
- ``qkv_rotary``: q/k/v as one GEMM over the concatenated weights, RoPE applied in place on its output, and
  in backward the RoPE transpose written straight into the one ``[tokens, q+k+v]`` gradient buffer of that
  GEMM (eager autograd concatenates the three gradients and makes ~10 more passes for the rotation).
- ``gate_up_silu``: gate/up as one GEMM and ``silu(gate) * up`` in one pass each way, the backward writing the
  gate and up gradients into one buffer.
- ``linear``: ``y = x W^T`` and the input gradient ``dy W`` through oneDNN (``model/prepack.py``, ~210-220
  GFLOP/s on the 2-core benchmark machine where MKL's sgemm reaches ~200), the weight gradient ``dy^T x``
  through MKL (``torch.mm``, the faster of the two for that reduction over tokens).
- ``causal_attention``: block-causal attention for up to ``EXPLICIT_ATTENTION_MAX_SEQ`` tokens: query rows in
  blocks of ``ATTENTION_BLOCK``, each block's scores as one batched GEMM against only the keys it can see,
  softmax and its backward in one pass each (C), the probabilities kept for backward. SDPA's CPU flash kernel
  recomputes them in backward through small GEMMs: 77 ms vs 50 ms forward+backward per layer at 4 x 512
  tokens, 12 heads / 4 kv heads, d 64.

Measured (``benchmarks/bench_model.py``, RESULTS.md): forward+backward of the 25M benchmark model went from
HF's time (ours/HF 1.03) to ours/HF ~0.85; the non-GEMM, non-attention work per block fell from ~29 ms to
~8 ms (profiled, 2 threads).

The Functions save what eager autograd would save (the GEMM inputs, the gate/up output), except that
``causal_attention`` keeps its probabilities (``launch/cpu_plan.py`` counts them), and they go through ``ctx.save_for_backward`` so activation checkpointing recomputes
them like any operator. Numerics: equal to the eager formulas to float rounding (tested in
``tests/unit/test_kernels.py``), not bit for bit. The kernels are compiled on first use
(``model/kernels/build.py``); without a C compiler, or with ``LLAMA_CPU_KERNELS=0``, ``applies`` is False
and the model runs its eager formulas.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from model import prepack
from model.kernels import build

log = logging.getLogger(__name__)
_warned = False


def _lib() -> ctypes.CDLL | None:
    global _warned
    lib = build.load()
    if lib is None and not _warned and build.last_error != "LLAMA_CPU_KERNELS=0":
        _warned = True
        log.warning("model.kernels: %s; the model runs its eager PyTorch formulas on CPU", build.last_error)
    return lib


_off = 0


def enabled() -> bool:
    """Whether the fused CPU path is on in this process: kernels built and loaded, oneDNN present, not
    inside ``disabled()``."""
    return not _off and prepack.available() and _lib() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this context the model runs its eager PyTorch formulas (comparisons, debugging)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


_concat_cache: dict[tuple, Tensor] | None = None


@contextlib.contextmanager
def reused_concatenations() -> Iterator[None]:
    """Within this context, forwards without autograd reuse the ``[wq; wk; wv]`` and ``[w1; w3]`` concatenations
    of the fused projections instead of copying the weights again on every call: many small no-grad forwards
    (evaluation's batches of a few requests) spent ~8% of their model time in that copy (``aten::cat`` in a
    profile of the 56M evaluation benchmark). Costs one extra copy of those weights (about two thirds of a
    block) until the context exits; an entry is used only while every weight is the same tensor at the same
    version (an in-place update in between makes a new one)."""
    global _concat_cache
    outer = _concat_cache
    _concat_cache = {} if outer is None else outer
    try:
        yield
    finally:
        _concat_cache = outer


def _concatenated(*weights: Tensor) -> Tensor:
    """``torch.cat(weights)``, from ``reused_concatenations``' cache when one is open and autograd is off."""
    if _concat_cache is None or torch.is_grad_enabled():
        return torch.cat(weights)
    key = tuple((id(w), w._version, w.data_ptr()) for w in weights)
    cached = _concat_cache.get(key)
    if cached is None:
        cached = _concat_cache[key] = torch.cat(weights)
    return cached


def applies(*tensors: Tensor) -> bool:
    """Whether the fused CPU path runs for these tensors: ``enabled()`` and all of them fp32 on the CPU."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return enabled()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(x: Tensor) -> Tensor:
    """``x`` as a contiguous ``[tokens, features]`` matrix (a view when it already is contiguous)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _threads() -> int:
    return torch.get_num_threads()


def _onednn_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``x [m, k] @ weight [n, k]^T`` (oneDNN; ``weight`` may be a transposed view)."""
    return prepack.linear(x, weight)


def _save(ctx, *tensors: Tensor) -> None:
    """``ctx.save_for_backward`` when a gradient can be asked for. Like eager autograd, nothing is recorded for
    a frozen model (the PPO reference policy, a reward model) or under ``torch.inference_mode`` (rollouts),
    where torch refuses to save the inference tensors such a forward makes."""
    if any(ctx.needs_input_grad) and not torch.is_inference_mode_enabled():
        ctx.save_for_backward(*tensors)


def _split_rows(t: Tensor, sizes: list[int], needs: tuple[bool, ...]) -> list[Tensor | None]:
    return [part if need else None for part, need in zip(t.split(sizes), needs)]


# ---------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = _rows(x)
        out = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32)
        _lib().rms_norm_forward(_ptr(rows), _ptr(weight.contiguous()), _ptr(out), _ptr(rstd), rows.shape[0],
                                rows.shape[1], eps, _threads())
        _save(ctx, rows, weight, rstd)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        rows, weight, rstd = ctx.saved_tensors
        grad_rows = _rows(grad_out)
        grad_x = torch.empty_like(rows)
        threads = _threads()
        partial = torch.zeros(threads, rows.shape[1]) if ctx.needs_input_grad[1] else None
        _lib().rms_norm_backward(_ptr(grad_rows), _ptr(rows), _ptr(weight.contiguous()), _ptr(rstd), _ptr(grad_x),
                                 _ptr(partial), rows.shape[0], rows.shape[1], threads)
        grad_weight = partial.sum(0) if partial is not None else None
        return grad_x.view(grad_out.shape), grad_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` (fp32 CPU; check ``applies`` first)."""
    return _RMSNorm.apply(x, weight, eps)


# ---------------------------------------------------------------------------------------------------
# q/k/v projection + RoPE
# ---------------------------------------------------------------------------------------------------
def _strides(t: Tensor) -> ctypes.Array:
    """Element strides of ``t [batch, seq, heads, head_dim]`` for batch, seq and head."""
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


class _QKVRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int, head_dim: int,
                wq: Tensor, wk: Tensor, wv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq, _ = x.shape
        rows = _rows(x)
        weight = _concatenated(wq, wk, wv)
        qkv = _onednn_matmul(rows, weight)
        _lib().rope_qk_forward(_ptr(qkv), _ptr(cos), _ptr(sin), batch, seq, cos.shape[0], heads, kv_heads, head_dim,
                               _threads())
        _save(ctx, rows, weight, cos, sin)
        ctx.shape = (batch, seq, heads, kv_heads, head_dim)
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=1)
        return (q.view(batch, seq, heads, head_dim), k.view(batch, seq, kv_heads, head_dim),
                v.view(batch, seq, kv_heads, head_dim))

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor) -> tuple[Tensor | None, ...]:
        rows, weight, cos, sin = ctx.saved_tensors
        batch, seq, heads, kv_heads, head_dim = ctx.shape
        dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
        grad_qkv = torch.empty(rows.shape[0], weight.shape[0])
        _lib().rope_qk_backward(_ptr(dq), _strides(dq), _ptr(dk), _strides(dk), _ptr(dv), _strides(dv), _ptr(cos),
                                _ptr(sin), _ptr(grad_qkv), batch, seq, cos.shape[0], heads, kv_heads, head_dim,
                                _threads())
        grad_x = _onednn_matmul(grad_qkv, weight.t()).view(batch, seq, -1) if ctx.needs_input_grad[0] else None
        needs_w = ctx.needs_input_grad[6:9]
        grad_w = [None] * 3
        if any(needs_w):
            q_width, kv_width = heads * head_dim, kv_heads * head_dim
            grad_w = _split_rows(grad_qkv.t() @ rows, [q_width, kv_width, kv_width], needs_w)
        return (grad_x, None, None, None, None, None, *grad_w)


def qkv_rotary(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, cos: Tensor, sin: Tensor, *, heads: int,
               kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x [b, s, dim]`` -> RoPE-rotated ``q [b, s, heads, head_dim]``, ``k``, and ``v [b, s, kv_heads, head_dim]``.

    ``cos``/``sin``: ``[b or 1, s, head_dim/2]`` (``RotaryEmbedding``'s tables for these positions).
    """
    return _QKVRotary.apply(x, cos.contiguous(), sin.contiguous(), heads, kv_heads, head_dim, wq, wk, wv)


# ---------------------------------------------------------------------------------------------------
# gate/up projection + SwiGLU
# ---------------------------------------------------------------------------------------------------
class _GateUpSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
        rows = _rows(x)
        weight = _concatenated(w1, w3)
        gate_up = _onednn_matmul(rows, weight)
        ffn = w1.shape[0]
        hidden = torch.empty(rows.shape[0], ffn)
        _lib().swiglu_forward(_ptr(gate_up), _ptr(hidden), rows.shape[0], ffn, _threads())
        _save(ctx, rows, weight, gate_up)
        return hidden.view(*x.shape[:-1], ffn)

    @staticmethod
    def backward(ctx, grad_hidden: Tensor) -> tuple[Tensor | None, ...]:
        rows, weight, gate_up = ctx.saved_tensors
        ffn = weight.shape[0] // 2
        grad_gate_up = torch.empty_like(gate_up)
        _lib().swiglu_backward(_ptr(_rows(grad_hidden)), _ptr(gate_up), _ptr(grad_gate_up), rows.shape[0], ffn,
                               _threads())
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad_gate_up, weight.t()).view(*grad_hidden.shape[:-1], -1)
        needs_w = ctx.needs_input_grad[1:3]
        grad_w = _split_rows(grad_gate_up.t() @ rows, [ffn, ffn], needs_w) if any(needs_w) else [None, None]
        return (grad_x, *grad_w)


def gate_up_silu(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    """``silu(x w1^T) * (x w3^T)``, the input of SwiGLU's down projection, ``[..., ffn]``."""
    return _GateUpSilu.apply(x, w1, w3)


# ---------------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------------
class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        rows = _rows(x)
        _save(ctx, rows, weight)
        return _onednn_matmul(rows, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        rows, weight = ctx.saved_tensors
        grad_rows = _rows(grad_out)
        grad_x = _onednn_matmul(grad_rows, weight.t()).view(*grad_out.shape[:-1], -1) if ctx.needs_input_grad[0] else None
        grad_w = grad_rows.t() @ rows if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` without bias: oneDNN forward and input gradient, MKL weight gradient."""
    return _Linear.apply(x, weight)


# ---------------------------------------------------------------------------------------------------
# Causal self-attention
# ---------------------------------------------------------------------------------------------------
ATTENTION_BLOCK = 64
"""Query rows per block: block i (rows ``[64 i, 64 (i+1))``) multiplies only keys ``[0, 64 (i+1))``, so the
GEMMs skip most of the masked upper triangle (56% of the square at 512 tokens instead of 100%). Measured
forward+backward for 4 x 512 tokens, 12 heads / 4 kv heads, d 64 (2 cores): 49.8 ms at 64 rows, 52.7 at 128,
59.3 at 256; SDPA's flash kernel 77.1."""

EXPLICIT_ATTENTION_MAX_SEQ = 1024
"""Longest sequence for ``causal_attention``. It keeps the attention probabilities for backward
(``batch * heads * seq^2 * 9/16`` floats at 512 tokens: 19 MB per layer for the 25M benchmark model) where the
flash kernel keeps only a log-sum-exp per row; beyond 1024 tokens that quadratic memory is not worth the speed
and ``scaled_dot_product_attention`` runs instead."""


def attention_blocks(seq: int) -> list[tuple[int, int]]:
    """``(first, end)`` query rows of each block; block ``(first, end)`` attends to keys ``[0, end)``."""
    return [(row0, min(row0 + ATTENTION_BLOCK, seq)) for row0 in range(0, seq, ATTENTION_BLOCK)]


def attention_keys_per_query(seq: int) -> float:
    """Mean number of key columns per query row that ``causal_attention`` computes and keeps for backward."""
    return sum((end - first) * end for first, end in attention_blocks(seq)) / seq


def attention_applies(q: Tensor, k: Tensor, v: Tensor, seq: int) -> bool:
    """Whether ``causal_attention`` runs for these q/k/v (``[b, s, heads, head_dim]``) of ``seq`` tokens."""
    return 1 < seq <= EXPLICIT_ATTENTION_MAX_SEQ and applies(q, k, v)


def _by_kv_head(x: Tensor, kv_heads: int) -> Tensor:
    """``x [b, n, heads, d]`` -> contiguous ``[b * kv_heads, (heads / kv_heads) * n, d]``: each kv head's query
    heads stacked along the rows, so one batched GEMM serves a whole group of grouped-query attention."""
    b, n, heads, d = x.shape
    group = heads // kv_heads
    return x.view(b, n, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(b * kv_heads, group * n, d)


def _from_kv_head(x: Tensor, *, b: int, kv_heads: int, group: int) -> Tensor:
    """The inverse of ``_by_kv_head``: ``[b * kv_heads, group * n, d]`` -> ``[b, n, kv_heads * group, d]``."""
    n, d = x.shape[1] // group, x.shape[2]
    return x.view(b, kv_heads, group, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, kv_heads * group, d)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        b, s, heads, d = q.shape
        kv_heads = k.shape[2]
        group = heads // kv_heads
        scale = d ** -0.5
        keys = k.permute(0, 2, 1, 3).reshape(b * kv_heads, s, d)
        values = v.permute(0, 2, 1, 3).reshape(b * kv_heads, s, d)
        mask_bytes = None if mask is None else mask.reshape(b, s, s).contiguous().view(torch.uint8)
        out = torch.empty(b, s, heads, d)
        queries, probs = [], []
        lib, threads = _lib(), _threads()
        for row0, row1 in attention_blocks(s):
            n = row1 - row0
            q_block = _by_kv_head(q[:, row0:row1], kv_heads)
            p = torch.bmm(q_block, keys[:, :row1].transpose(1, 2))
            lib.causal_softmax_forward(_ptr(p), b * heads, n, row1, row0, scale, _ptr(mask_bytes), heads, s, threads)
            o = torch.bmm(p, values[:, :row1])
            out[:, row0:row1] = _from_kv_head(o, b=b, kv_heads=kv_heads, group=group)
            queries.append(q_block)
            probs.append(p)
        _save(ctx, keys, values, out, *queries, *probs)
        ctx.layout = (b, s, heads, kv_heads, d, len(queries))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        keys, values, out, *rest = ctx.saved_tensors
        b, s, heads, kv_heads, d, n_blocks = ctx.layout
        queries, probs = rest[:n_blocks], rest[n_blocks:]
        group, scale = heads // kv_heads, d ** -0.5
        grad_q = torch.empty(b, s, heads, d)
        grad_k = torch.zeros(b * kv_heads, s, d)
        grad_v = torch.zeros(b * kv_heads, s, d)
        lib, threads = _lib(), _threads()
        # rowsum(dO * O) once for all rows, [b, s, heads, 1] -> per block in the rows' [kv head, group, row] order
        delta_all = (grad_out * out).sum(-1, keepdim=True)
        for i, (row0, row1) in enumerate(attention_blocks(s)):
            n = row1 - row0
            q_block, p = queries[i], probs[i]
            go = _by_kv_head(grad_out[:, row0:row1], kv_heads)
            delta = _by_kv_head(delta_all[:, row0:row1], kv_heads)
            grad_v[:, :row1] += torch.bmm(p.transpose(1, 2), go)
            dp = torch.bmm(go, values[:, :row1].transpose(1, 2))
            lib.causal_softmax_backward(_ptr(dp), _ptr(p), _ptr(delta), b * heads, n, row1, row0, scale, threads)
            dq = torch.bmm(dp, keys[:, :row1])
            grad_q[:, row0:row1] = _from_kv_head(dq, b=b, kv_heads=kv_heads, group=group)
            grad_k[:, :row1] += torch.bmm(dp.transpose(1, 2), q_block)
        as_bshd = lambda t: t.view(b, kv_heads, s, d).permute(0, 2, 1, 3)  # noqa: E731
        return grad_q, as_bshd(grad_k), as_bshd(grad_v), None


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal grouped-query attention ``softmax(q k^T / sqrt(d)) v`` -> ``[b, s, heads, head_dim]``.

    q: ``[b, s, heads, head_dim]``; k, v: ``[b, s, kv_heads, head_dim]`` (any strides). mask: None (causal) or
    the boolean ``[b, 1, s, s]`` document mask of ``model.attention.document_causal_mask``, which must lie inside the
    causal triangle (blocks above the diagonal are never computed). Check ``attention_applies`` first.
    """
    return _CausalAttention.apply(q, k, v, mask)
