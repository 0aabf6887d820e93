"""How the Llama network gets its linear and embedding layers: the single seam for tensor parallelism.

The model (``model/llama.py``) never builds ``nn.Linear`` directly. It asks a ``LayerFactory`` for
"a column-parallel linear", "a row-parallel linear", "the key/value projection", "the vocabulary embedding"
and "the output head", exactly the four roles of Megatron's tensor-parallel transformer:

    column:  Y = X A,  A split along its output dim  A = [A_1 ... A_p]   (q, gate, up; head over vocab)
    row:     Y = X A,  A split along its input dim, partial sums all-reduced  (o, down)

``LocalLayers`` (this module) is TP = 1: ``nn.Linear`` (the ``Linear`` subclass below, whose fp32 CPU GEMMs
run through oneDNN) / ``nn.Embedding`` in an ordinary Python process with no process group and no launcher,
so ``from_pretrained(DIR)(tokens)`` just works.
``model/parallel.py`` provides the megatron-core implementation of the same factory for TP > 1, so the
forward math is written once.

Every factory also reports how many heads of each kind live on this rank (``local_heads``,
``local_kv_heads``), because under TP the attention block sees only its own heads.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from model import kernels


class LayerFactory(Protocol):
    """What the model needs from a parallelism strategy. See module docstring for the roles."""

    tp_size: int

    def column(self, in_features: int, out_features: int) -> nn.Module: ...

    def row(self, in_features: int, out_features: int) -> nn.Module: ...

    def kv_projection(self, in_features: int, *, n_kv_heads: int, head_dim: int) -> nn.Module: ...

    def embedding(self, vocab_size: int, dim: int) -> nn.Module: ...

    def output_head(self, dim: int, vocab_size: int) -> nn.Module: ...

    def local_heads(self, n_heads: int) -> int: ...

    def local_kv_heads(self, n_kv_heads: int) -> int: ...


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose fp32 CPU GEMMs go through ``model.kernels.linear`` (oneDNN)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if kernels.applies(x, self.weight):
            return kernels.linear(x, self.weight)
        return super().forward(x)


class LocalLayers:
    """Tensor parallel size 1: ordinary PyTorch layers, usable with no process group at all."""

    tp_size = 1

    def column(self, in_features: int, out_features: int) -> nn.Module:
        return Linear(in_features, out_features)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return Linear(in_features, out_features)

    def kv_projection(self, in_features: int, *, n_kv_heads: int, head_dim: int) -> nn.Module:
        return Linear(in_features, n_kv_heads * head_dim)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab_size, dim)

    def output_head(self, dim: int, vocab_size: int) -> nn.Module:
        return Linear(dim, vocab_size)

    def local_heads(self, n_heads: int) -> int:
        return n_heads

    def local_kv_heads(self, n_kv_heads: int) -> int:
        return n_kv_heads
