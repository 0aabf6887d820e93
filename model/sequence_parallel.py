"""Megatron sequence parallelism (Korthikanti et al. 2022) on top of the tensor-parallel layers.

    from model.sequence_parallel import SequenceParallelLayers, sum_norm_grads_over_tp
    layers = SequenceParallelLayers()                 # after parallel_state.initialize_model_parallel(tp > 1)
    model = Llama(cfg, layers=layers); sum_norm_grads_over_tp(model, layers.group)
    logits = model(tokens)                            # the residual stream holds s / tp tokens per TP rank

Outside the tensor-parallel regions (RMSNorm, the residual adds) each TP rank keeps only its ``s / tp`` slice of
the sequence instead of a full copy, so those activations shrink by ``tp`` (``launch.planner``: ``Layout.sp``):

    embedding:        vocab-parallel lookup, all-reduced, then this rank's slice (backward: all-gather)
    q/k/v, w1/w3, head: all-gather the slice along the sequence, then the column-parallel matmul; only the slice is
                      kept for backward, where it is all-gathered again and the input gradient reduce-scattered
    wo, w2:           row-parallel matmul, then reduce-scatter along the sequence instead of an all-reduce
    norm weights:     each rank's gradient covers its slice only: summed over TP (``sum_norm_grads_over_tp``)

    final hidden states: ``Llama(return_hidden=True)`` gathers them whole (``whole_sequence``) for a head
                      replicated over TP (reward / value head); backward keeps this rank's slice of the gradient

RoPE, the attention mask and attention itself see the whole sequence (after the gather), so nothing else changes:
with context parallelism "the whole sequence" is this rank's two CP chunks (SP splits them over TP; the CP
kernel gathers K/V over CP after the TP gather); pipeline stages pass the s / tp slice between stages and scale
RoPE positions by ``sequence_split``. Every collective is ``model.comm``'s. Training forwards only: a forward
without autograd (scoring, evaluation, generation and its one-token KV-cache steps, also through a copy built
with these layers: PPO's rollout copy) runs as plain tensor parallelism (``SplitState``). Not with
``tp > n_kv_heads`` (replicated K/V projections). LoRA adapters split with their layers (``model.lora``). On by
default at tp > 1 where it can run (``train.parallelize.resolve_sequence_parallel``: the objectives that declare
``supports_sequence_parallel``; batches of varying length are padded to a multiple of TP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import comm
from model.parallel import MegatronLayers, sum_grad_over_tp


class _GatheredLinear(torch.autograd.Function):
    """``all_gather(x, seq) @ W^T`` keeping only the local ``x`` for backward (Megatron's SP column matmul)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return F.linear(torch.cat(comm.all_gather(x.contiguous(), group=group), dim=1), weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        full = torch.cat(comm.all_gather(x.contiguous(), group=ctx.group), dim=1)
        grad_weight = grad.flatten(0, -2).t().matmul(full.flatten(0, -2).to(grad.dtype))
        grad_full = grad.matmul(weight.to(grad.dtype))
        return comm.reduce_scatter(grad_full.contiguous(), dim=1, group=ctx.group), grad_weight.to(weight.dtype), None


class _SplitAlongSequence(torch.autograd.Function):
    """This rank's slice of a replicated ``[b, s, ...]`` tensor; backward all-gathers the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x.chunk(comm.world_size(group), dim=1)[comm.rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return torch.cat(comm.all_gather(grad.contiguous(), group=ctx.group), dim=1), None


class _GatherAlongSequence(torch.autograd.Function):
    """The whole ``[b, s, ...]`` from every rank's slice, for a consumer that TP replicates (a scalar head): each
    rank then computes the same gradient of the whole, so backward keeps this rank's slice of it (megatron-core's
    ``gather_from_sequence_parallel_region(tensor_parallel_output_grad=False)``)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return torch.cat(comm.all_gather(x.contiguous(), group=group), dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.chunk(comm.world_size(ctx.group), dim=1)[comm.rank(ctx.group)].contiguous(), None


class _AllReduceInForward(torch.autograd.Function):
    """Output summed over TP, gradient passed through (the output of a plain row-parallel matmul)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        return comm.all_reduce(x.contiguous(), group=group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class SplitState:
    """Whether this forward splits the sequence, shared by one model's sequence-parallel modules.

    Only forwards that record for backward split: SP saves activation memory kept for backward, and a forward
    without autograd (evaluation, scoring, generation, validation loss) reads the final hidden states whole and
    may run a KV cache, so it runs as plain tensor parallelism (same math). Every pipeline stage sees the same
    grad mode, so they agree. The embedding also turns the split off for a batch whose length TP does not
    divide (same math, the residual stream kept whole) instead of failing."""

    def __init__(self) -> None:
        self.split = True

    def active(self) -> bool:
        return self.split and torch.is_grad_enabled()


class SequenceParallelColumn(nn.Module):
    """A column-parallel layer whose input is this rank's sequence slice (weight: the mcore layer's)."""

    def __init__(self, layer: nn.Module, group: Any, state: SplitState) -> None:
        super().__init__()
        self.weight, self.group = layer.weight, group
        object.__setattr__(self, "state", state)

    def forward(self, x: Tensor) -> Tensor:
        if not self.state.active():
            return F.linear(sum_grad_over_tp(x, self.group), self.weight)
        return _GatheredLinear.apply(x, self.weight, self.group)


class SequenceParallelRow(nn.Module):
    """A row-parallel layer whose output is reduce-scattered to this rank's sequence slice."""

    def __init__(self, layer: nn.Module, group: Any, state: SplitState) -> None:
        super().__init__()
        self.weight, self.group = layer.weight, group
        object.__setattr__(self, "state", state)

    def forward(self, x: Tensor) -> Tensor:
        if not self.state.active():
            return _AllReduceInForward.apply(F.linear(x, self.weight), self.group)
        return comm.reduce_scatter_along_dim(F.linear(x, self.weight), dim=1, group=self.group)


class SequenceParallelEmbedding(nn.Module):
    """Vocab-parallel embedding, then this rank's slice of the sequence."""

    def __init__(self, layer: nn.Module, group: Any, state: SplitState) -> None:
        super().__init__()
        object.__setattr__(self, "lookup", layer)  # not a submodule: its one parameter is registered here
        object.__setattr__(self, "state", state)
        self.weight, self.group = layer.weight, group

    def _apply(self, fn: Any, recurse: bool = True) -> SequenceParallelEmbedding:
        # ``to`` / ``to_empty`` may replace the registered parameter by a new one (meta -> CPU: PPO's generation
        # copy); the lookup, not a submodule, must read that one, not the old tensor.
        super()._apply(fn, recurse)
        self.lookup.weight = self.weight
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        self.state.split = tokens.shape[1] % comm.world_size(self.group) == 0
        if not self.state.active():
            return self.lookup(tokens)
        return _SplitAlongSequence.apply(self.lookup(tokens), self.group)

    def whole_sequence(self, h: Tensor) -> Tensor:
        """``h`` (this rank's slice of the residual stream, or the whole of it in a forward that does not split)
        as the whole sequence: ``Llama(return_hidden=True)`` returns hidden states of every position, which a
        head replicated over TP reads (the reward head at the answer's last token, the PPO value head)."""
        return _GatherAlongSequence.apply(h, self.group) if self.state.active() else h


class SequenceParallelLayers(MegatronLayers):
    """``MegatronLayers`` with the sequence-parallel forms above (same parameters, same shard metadata)."""

    sequence_parallel = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = SplitState()

    @property
    def sequence_split(self) -> int:
        """How many ranks share the residual stream's sequence in this forward (pipeline stages scale RoPE
        positions by it): TP, or 1 in a forward that does not split (``SplitState``)."""
        return self.tp_size if self.state.active() else 1

    def column(self, in_features: int, out_features: int) -> nn.Module:
        return SequenceParallelColumn(super().column(in_features, out_features), self.group, self.state)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return SequenceParallelRow(super().row(in_features, out_features), self.group, self.state)

    def kv_projection(self, in_features: int, *, n_kv_heads: int, head_dim: int) -> nn.Module:
        if n_kv_heads % self.tp_size:
            raise ValueError(f"sequence parallelism needs tp={self.tp_size} to divide n_kv_heads={n_kv_heads} "
                             "(replicated K/V projections are not sequence-parallel); lower tp or turn it off")
        return self.column(in_features, n_kv_heads * head_dim)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return SequenceParallelEmbedding(super().embedding(vocab_size, dim), self.group, self.state)


def sum_norm_grads_over_tp(model: nn.Module, group: Any) -> None:
    """Each TP rank's RMSNorm weight gradient covers its sequence slice: sum them over the TP group (trained norms
    only: LoRA freezes them)."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") and param.requires_grad:
            param.register_hook(lambda grad: comm.all_reduce(grad.clone(), group=group))
