"""Tensor parallelism for the Llama network: megatron-core layers behind the ``LayerFactory`` seam.

    from megatron.core import parallel_state
    from model.parallel import MegatronLayers, token_cross_entropy
    model = Llama(cfg, layers=MegatronLayers())          # after parallel_state.initialize_model_parallel(...)
    logits = model(tokens)                                # [b, s, vocab / tp]: this rank's vocabulary slice
    losses = token_cross_entropy(logits, labels, tp_size=2)   # [b, s], the full logits are never gathered

Megatron's decomposition (Shoeybi et al. 2019), per block:

    q, k, v, gate, up:  Y = X A,  A = [A_1, ..., A_p] split along its output dim (column parallel);
                        the input X is replicated, its gradient all-reduced across the TP group.
    o, down:            Y = sum_i X_i A_i, A split along its input dim (row parallel): one all-reduce.
    embedding:          rows split by vocabulary range, partial lookups all-reduced.
    output head:        column parallel over the vocabulary; the loss is ``vocab_parallel_cross_entropy``.

Grouped-query attention: when ``tp`` divides ``n_kv_heads`` the k/v projections are column parallel like q.
When ``tp > n_kv_heads`` (Llama 3.1 405B at TP 16 has 8 kv heads) every rank keeps the *whole* k/v weight
(``ReplicatedKVProjection``) and uses the rows of the kv head its query heads belong to; the weight's
gradient is summed over the TP group, so all replicas stay identical and count once in the grad norm.

Only the CPU-safe mcore paths are used (``gather_output=False``, ``input_is_parallel=True``, no sequence
parallel, CPU initialisation): see ``../shared/STACK.md``. Weights are created empty and filled by
``init_llama_weights``, which draws every *full* tensor from the seed and keeps this rank's slice
(``param.tp_shard``), so every TP size starts from the same model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import Tensor, nn

from model import comm


def _no_init(weight: Tensor) -> None:
    """Weights are filled later by ``init_llama_weights`` (layout-independent)."""


def _mark_shard(param: Tensor, *, full_shape: tuple[int, ...], dim: int, rank: int, size: int) -> None:
    """Tell ``init_llama_weights``, the checkpoint code and DeepSpeed how this shard sits in the full tensor.

    mcore sets ``tensor_model_parallel`` only while initialising; with initialisation skipped we set it, or
    DeepSpeed's gradient norm would count the sharded weights on TP rank 0 only.
    """
    if not getattr(param, "tensor_model_parallel", False):
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(param, attr):
                delattr(param, attr)
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    param.tp_full_shape = torch.Size(full_shape)
    param.tp_dim = dim
    param.tp_shard = lambda full: full.chunk(size, dim=dim)[rank].contiguous()


class ColumnLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` returning only the output (mcore returns ``(output, bias)``)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """``RowParallelLinear`` returning only the (all-reduced) output."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the TP group (replicated weights)."""

    @staticmethod
    def forward(ctx, weight: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return comm.all_reduce(grad.contiguous(), group=ctx.group), None


def sum_grad_over_tp(x: Tensor, group: Any) -> Tensor:
    """``x`` unchanged; its gradient all-reduced over the TP group (a replicated weight, or the input of a plain
    column-parallel matmul whose other ranks consume the same tensor)."""
    return _SumGradOverTP.apply(x, group)


class ReplicatedKVProjection(nn.Module):
    """k or v projection when ``tp > n_kv_heads``: the full weight on every rank, this rank's head used.

    With ``g = tp / n_kv_heads`` ranks per kv head, TP rank ``r`` serves query heads of kv head ``r // g``.
    The input goes through ``copy_to_tensor_model_parallel_region`` (its gradient is summed over TP, like a
    column-parallel layer's) and the weight through ``sum_grad_over_tp``, so every replica receives the
    gradient of the whole weight.
    """

    def __init__(self, in_features: int, *, n_kv_heads: int, head_dim: int, tp_rank: int, tp_size: int,
                 group: Any) -> None:
        super().__init__()
        if tp_size % n_kv_heads:
            raise ValueError(f"tensor-parallel size {tp_size} must be a multiple of n_kv_heads={n_kv_heads} "
                             "to replicate kv heads (or divide it to split them)")
        self.weight = nn.Parameter(torch.empty(n_kv_heads * head_dim, in_features))
        self.head_dim, self.group = head_dim, group
        self.head = tp_rank // (tp_size // n_kv_heads)

    def forward(self, x: Tensor) -> Tensor:
        x = copy_to_tensor_model_parallel_region(x, group=self.group)
        weight = sum_grad_over_tp(self.weight, self.group)
        rows = weight[self.head * self.head_dim : (self.head + 1) * self.head_dim]
        return F.linear(x, rows)


class MegatronLayers:
    """``LayerFactory`` over megatron-core tensor-parallel layers (needs ``parallel_state`` initialised)."""

    def __init__(self, *, params_dtype: torch.dtype = torch.float32) -> None:
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("MegatronLayers needs megatron.core.parallel_state.initialize_model_parallel() "
                               "first (train.topology.Topology.initialize does it)")
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        # CPU initialisation (the CUDA path needs mcore's RNG tracker) with initialisation skipped: the
        # weights are drawn by init_llama_weights; DeepSpeed moves the module to the device afterwards.
        self.config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                          perform_initialization=False, params_dtype=params_dtype)

    def _mark(self, module: nn.Module, *, full_shape: tuple[int, int], dim: int) -> nn.Module:
        _mark_shard(module.weight, full_shape=full_shape, dim=dim, rank=self.tp_rank, size=self.tp_size)
        return module

    def column(self, in_features: int, out_features: int) -> nn.Module:
        layer = ColumnLinear(in_features, out_features, config=self.config, init_method=_no_init, bias=False,
                             gather_output=False, tp_group=self.group)
        return self._mark(layer, full_shape=(out_features, in_features), dim=0)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        layer = RowLinear(in_features, out_features, config=self.config, init_method=_no_init, bias=False,
                          input_is_parallel=True, skip_bias_add=False, tp_group=self.group)
        return self._mark(layer, full_shape=(out_features, in_features), dim=1)

    def kv_projection(self, in_features: int, *, n_kv_heads: int, head_dim: int) -> nn.Module:
        if n_kv_heads % self.tp_size == 0:
            return self.column(in_features, n_kv_heads * head_dim)
        return ReplicatedKVProjection(in_features, n_kv_heads=n_kv_heads, head_dim=head_dim,
                                      tp_rank=self.tp_rank, tp_size=self.tp_size, group=self.group)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        self._check_vocab(vocab_size)
        layer = VocabParallelEmbedding(vocab_size, dim, init_method=_no_init, config=self.config,
                                       tp_group=self.group)
        return self._mark(layer, full_shape=(vocab_size, dim), dim=0)

    def output_head(self, dim: int, vocab_size: int) -> nn.Module:
        self._check_vocab(vocab_size)
        return self.column(dim, vocab_size)

    def local_heads(self, n_heads: int) -> int:
        return n_heads // self.tp_size

    def local_kv_heads(self, n_kv_heads: int) -> int:
        return max(1, n_kv_heads // self.tp_size)

    def _check_vocab(self, vocab_size: int) -> None:
        if vocab_size % self.tp_size:
            raise ValueError(f"vocab_size={vocab_size} is not divisible by tensor-parallel size {self.tp_size}; "
                             f"pad it (--model.overrides.vocab_size={-(-vocab_size // self.tp_size) * self.tp_size})")


def token_cross_entropy(logits: Tensor, labels: Tensor, *, tp_size: int) -> Tensor:
    """Per-token cross entropy ``[b, s]`` in fp32; vocab-parallel (no gather of the logits) when ``tp_size > 1``."""
    if tp_size == 1:
        flat = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        return flat.view_as(labels)
    return vocab_parallel_cross_entropy(logits.float(), labels)


def gather_vocab_logits(logits: Tensor, *, group: Any, tp_size: int) -> Tensor:
    """Full-vocabulary logits from vocab-parallel ones (generation, evaluation of samples); no autograd."""
    if tp_size == 1:
        return logits
    return torch.cat(comm.all_gather(logits, group=group), dim=-1)


def tp_shard_info(param: Tensor) -> int | None:
    """The dimension along which a parameter is split over TP ranks, or None when it is whole on every rank."""
    return getattr(param, "tp_dim", None)

