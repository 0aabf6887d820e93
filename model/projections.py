"""The block's projections, by the fastest path that applies to each call: q/k/v (+ RoPE), SwiGLU's gate/up.

    from model.projections import linear_or_packed, project_qkv, swiglu_hidden
    q, k, v = project_qkv(attention, x, rope, packed=None)   # [b, s, heads | kv_heads, head_dim], RoPE applied
    hidden = swiglu_hidden(feed_forward, x, packed=None)     # silu(w1 x) * w3 x

The math is the paper's (``model/llama.py``); the paths differ only in how the GEMMs are grouped and where
they run. ``choose_path`` picks one per call, for q/k/v and for gate/up alike:

    path            runs when                                     what it does
    packed_decode   a no-grad one-token decode step whose cache   one oneDNN GEMM over the prepacked [wq; wk; wv]
                    holds prepacked weights (``model/prepack``)   (or [w1; w3]), ~28 GB/s weight streaming
    fused_cpu       several tokens, plain linears, fp32 on CPU,   one autograd node over C kernels + oneDNN:
                    kernels built (``model/kernels``)             q/k/v GEMM with RoPE in place / gate-up + SwiGLU
    fused_gemm      several tokens, plain linears, on CPU but     one GEMM over the concatenated weights
                    not fused_cpu (bf16, kernels off)
    separate        anything else (GPU, TP layers, one token)     one call per layer module

Only multi-token inputs read a child's weight directly (``fused_*``): a decode step calls the modules (or
their packed copy), because reading a child's weight outside that child's own forward is what ZeRO-3 has to
gather for (the engine's forward prologue does it for training and scoring).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import kernels, prepack
from model.rope import apply_rotary

QKV = tuple[Tensor, Tensor, Tensor]
QKVPath = Callable[[Any, Tensor, tuple[Tensor, Tensor], Any], QKV]


def all_plain_linear(*modules: nn.Module) -> bool:
    """Whether every module is a plain ``nn.Linear`` (not a tensor-parallel layer) whose forward is only its
    weight's product (``needs_call``: LoRA adapters or dtype hooks on it, ``model/lora.py``)."""
    return all(isinstance(m, nn.Linear) and not getattr(m, "needs_call", False) for m in modules)


def fused_linear(x: Tensor, *layers: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` as one matmul over the concatenated weights.

    Parameters stay separate (checkpoint names, tensor-parallel sharding and optimizer state are untouched);
    only the GEMM is merged: one [tokens, dim] x [dim, q+k+v] product instead of three narrower ones measured
    ~12% faster forward+backward on CPU for the 25M benchmark model. Used for multi-token CPU inputs at TP=1
    when the fused CPU path does not apply (bf16, kernels off); single-token decode keeps separate calls, where
    the weight concatenation would cost more than it saves, and GPUs too (see ``choose_path``).
    """
    weight = torch.cat([layer.weight for layer in layers])
    return F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1)


def linear_or_packed(layer: nn.Module, x: Tensor, packed: Tensor | None) -> Tensor:
    """``layer(x)``, or the same product through its prepacked weight during a CPU decode step."""
    return prepack.linear(x, packed) if packed is not None else layer(x)


# ---------------------------------------------------------------------------------------------------
# q, k, v and RoPE
# ---------------------------------------------------------------------------------------------------
def _rotated(attention: Any, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor]) -> QKV:
    """``[b, s, width]`` projections -> ``[b, s, heads, head_dim]`` with RoPE applied to q and k."""
    batch, seq, _ = q.shape
    q = q.view(batch, seq, attention.n_heads, attention.head_dim)
    k = k.view(batch, seq, attention.n_kv_heads, attention.head_dim)
    v = v.view(batch, seq, attention.n_kv_heads, attention.head_dim)
    return apply_rotary(q, *rope), apply_rotary(k, *rope), v


def _packed_decode_qkv(attention: Any, x: Tensor, rope: tuple[Tensor, Tensor], packed: Any) -> QKV:
    kv_width = attention.n_kv_heads * attention.head_dim
    q, k, v = prepack.linear(x, packed.qkv).split([attention.n_heads * attention.head_dim, kv_width, kv_width], -1)
    return _rotated(attention, q, k, v, rope)


def _fused_cpu_qkv(attention: Any, x: Tensor, rope: tuple[Tensor, Tensor], packed: Any) -> QKV:
    cos, sin = (t.squeeze(2) for t in rope)  # projection and RoPE in one kernel
    return kernels.qkv_rotary(x, attention.wq.weight, attention.wk.weight, attention.wv.weight, cos, sin,
                              heads=attention.n_heads, kv_heads=attention.n_kv_heads, head_dim=attention.head_dim)


def _fused_gemm_qkv(attention: Any, x: Tensor, rope: tuple[Tensor, Tensor], packed: Any) -> QKV:
    return _rotated(attention, *fused_linear(x, attention.wq, attention.wk, attention.wv), rope)


def _separate_qkv(attention: Any, x: Tensor, rope: tuple[Tensor, Tensor], packed: Any) -> QKV:
    return _rotated(attention, attention.wq(x), attention.wk(x), attention.wv(x), rope)


QKV_PATHS: dict[str, QKVPath] = {"packed_decode": _packed_decode_qkv, "fused_cpu": _fused_cpu_qkv,
                                 "fused_gemm": _fused_gemm_qkv, "separate": _separate_qkv}


def choose_path(layers: tuple[nn.Module, ...], x: Tensor, packed: Any) -> str:
    """``"packed_decode"``, ``"fused_cpu"``, ``"fused_gemm"`` or ``"separate"`` for a projection of ``x`` by
    ``layers`` (q/k/v, or gate/up) in this call: the table in the module docstring."""
    if packed is not None:
        return "packed_decode"
    if x.shape[1] > 1 and all_plain_linear(*layers):
        if kernels.applies(x, *(layer.weight for layer in layers)):
            return "fused_cpu"
        # On a GPU the concatenated weight is a new tensor per block per forward that autograd keeps for
        # backward (bench_1p5b: ~80 MB per layer per micro-batch in flight) for a gain measured only on CPU.
        if x.device.type == "cpu":
            return "fused_gemm"
    return "separate"


def project_qkv(attention: Any, x: Tensor, rope: tuple[Tensor, Tensor], *, packed: Any = None) -> QKV:
    """``attention``'s q ``[b, s, heads, head_dim]``, k and v ``[b, s, kv_heads, head_dim]``, q and k rotated.

    ``packed``: the block's prepacked weights during a CPU decode step (``KVCache.packed_block``), else None.
    """
    path = choose_path((attention.wq, attention.wk, attention.wv), x, packed)
    return QKV_PATHS[path](attention, x, rope, packed)


# ---------------------------------------------------------------------------------------------------
# SwiGLU's gate and up projections
# ---------------------------------------------------------------------------------------------------
def swiglu_hidden(feed_forward: Any, x: Tensor, *, packed: Any = None) -> Tensor:
    """``silu(w1 x) * (w3 x)``, the input of SwiGLU's down projection ``w2``."""
    path = choose_path((feed_forward.w1, feed_forward.w3), x, packed)
    if path == "fused_cpu":  # both projections and SwiGLU in one autograd node
        return kernels.gate_up_silu(x, feed_forward.w1.weight, feed_forward.w3.weight)
    if path == "packed_decode":
        gate, up = prepack.linear(x, packed.gate_up).chunk(2, dim=-1)
    elif path == "fused_gemm":
        gate, up = fused_linear(x, feed_forward.w1, feed_forward.w3)
    else:
        gate, up = feed_forward.w1(x), feed_forward.w3(x)
    return F.silu(gate) * up
