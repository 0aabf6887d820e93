"""Prepacked weights for the single-token decode steps of generation on CPU (oneDNN small-batch GEMMs).

    cache = KVCache.allocate(model, batch=8, max_len=272)   # packs when eligible (see ``pack_for_decode``)
    cache.packed.blocks[i].qkv, cache.packed.output_logits(hidden)

Why this exists: a decode step multiplies a ``[batch, dim]`` activation by every weight matrix once, so its
time is the time to read the weights. ``F.linear`` (MKL sgemm) prepares the weight matrix again on every call
of such a skinny product: on the 2-core AMD EPYC benchmark machine it streams weights at ~7-8 GB/s with one
or two threads, while the memory system delivers ~55 GB/s to a plain ``sum``. oneDNN's matmul on a weight
reordered once for that batch size (``torch.ops.mkldnn._reorder_linear_weight``, the op TorchInductor's CPU
weight prepacking uses) streams at ~28 GB/s with two threads: generation of the 25M benchmark model went
from ~510 to ~760 tokens/s (``benchmarks/bench_model.py``).

The reorder is done once per ``KVCache`` (one ``generate()`` call; ~40 ms for 25M parameters), from the
weights as they are at that moment, and q/k/v and gate/up are packed as one matrix each, so a decode step
runs four GEMMs per block instead of seven. Cost: a second copy of every linear weight while the cache lives,
so only models whose linear weights total at most ``MAX_PACKED_BYTES`` are packed. Numerics: the same
products summed in oneDNN's order instead of MKL's, so logits agree with ``F.linear`` to float rounding
(~1e-6 relative), not bit for bit; prefill, training and every multi-token forward are untouched.

Eligible: a CPU model in fp32 whose linear layers are all plain ``nn.Linear`` with their full weights (not
megatron tensor-parallel layers, not ZeRO-3 partitions), with the oneDNN ops present in this torch build.
Anything else gets ``None`` and the ordinary ``F.linear`` path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

MAX_PACKED_BYTES = 2 * 2**30
"""Largest total size of linear weights that is duplicated in packed form (2 GiB: ~500M fp32 parameters)."""


@functools.cache
def available() -> bool:
    """Whether this torch build has oneDNN and the two ops used here (asked once per process: the fused CPU
    path checks it before every block's GEMMs)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def linear(x: Tensor, packed: Tensor) -> Tensor:
    """``F.linear(x, weight)`` for a weight packed by ``pack``; ``x [..., in_features]``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def pack(weight: Tensor, *, batch: int) -> Tensor:
    """``weight [out, in]`` reordered for oneDNN matmuls with ``batch`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)


@dataclass
class BlockWeights:
    """One transformer block's packed weights: ``[wq; wk; wv]``, ``wo``, ``[w1; w3]``, ``w2``."""

    qkv: Tensor
    wo: Tensor
    gate_up: Tensor
    w2: Tensor


@dataclass
class PackedWeights:
    """Packed weights of every block and of the output head, for decode steps of ``batch`` rows."""

    batch: int
    blocks: list[BlockWeights]
    output: Tensor

    def output_logits(self, hidden: Tensor) -> Tensor:
        """``model.output(hidden)`` through the packed head."""
        return linear(hidden, self.output)


def _plain(*modules: nn.Module) -> bool:
    return all(isinstance(m, nn.Linear) and not getattr(m, "needs_call", False) and m.bias is None and m.weight.shape == (m.out_features, m.in_features)
               for m in modules)


def pack_for_decode(model: Any, *, batch: int) -> PackedWeights | None:
    """``PackedWeights`` for ``model`` (a ``model.llama.Llama``) if it is eligible (see the module docstring),
    else None."""
    layers = getattr(model, "layers", None)
    head = getattr(model, "output", None)
    if layers is None or head is None or not available():
        return None
    linears = [head]
    for block in layers:
        a, f = block.attention, block.feed_forward
        linears += [a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2]
    if not _plain(*linears):
        return None
    weights = [m.weight for m in linears]
    if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return None
    if sum(w.numel() * w.element_size() for w in weights) > MAX_PACKED_BYTES:
        return None
    with torch.no_grad():
        blocks = []
        for block in layers:
            a, f = block.attention, block.feed_forward
            blocks.append(BlockWeights(
                qkv=pack(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]), batch=batch),
                wo=pack(a.wo.weight, batch=batch),
                gate_up=pack(torch.cat([f.w1.weight, f.w3.weight]), batch=batch),
                w2=pack(f.w2.weight, batch=batch)))
        return PackedWeights(batch=batch, blocks=blocks, output=pack(head.weight, batch=batch))
