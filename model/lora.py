"""LoRA (Hu et al. 2021): low-rank adapters on chosen projections of a ``Llama``, base weights frozen.

    from model.lora import LoRASpec, apply_lora, merge_lora, adapter_state_dict
    spec = LoRASpec(rank=8, alpha=16, targets=("q", "k", "v", "o"))
    adapted = apply_lora(model, spec)             # names of the adapted layers; only adapters require grad
    loss.backward(); optimizer = AdamW([p for p in model.parameters() if p.requires_grad])
    merge_lora(model)                             # W <- W + (alpha / r) B A in place, adapters removed

Per adapted layer ``W`` (a projection ``y = x W^T``) the forward becomes

    y = x W^T + (alpha / r) * dropout(x) A^T B^T,    A: [r, in] (random),  B: [out, r] (zeros)

so with ``B = 0`` the first forward is exactly the base model's. The adapters are child modules of the layer they
adapt (``layers.0.attention.wq.lora_A.weight`` / ``.lora_B.weight``, PEFT's names inside our own), attached with a
forward hook: the layer and the names of its weights stay as they are, so checkpoints, tensor-parallel slicing and
ZeRO see an ordinary module with two more small parameters. A hooked layer must be *called* (``model.projections``
skips its fused paths for it: ``needs_call``).

Tensor parallelism (Megatron layers, ``model/parallel.py``), for ``y = x W^T`` split as the base layer is:

    column-parallel W (split by output rows): A replicated, B split by rows like W.  The input x is replicated;
        its gradient, and A's, are sums over the TP ranks' output slices (all-reduced in backward).
    row-parallel W (split by input columns):  A split by columns like W, B replicated.  The partial products
        x_i A_i^T are all-reduced in forward (like W's own), after which B sees the same input on every rank.

Sequence parallelism (``model/sequence_parallel.py``; while its ``SplitState`` is active) splits the layers' inputs
and outputs outside the TP regions along the sequence, so the adapters follow their layer:

    column-parallel W: x is this rank's sequence slice: all-gathered before A (its gradient reduce-scattered
        back), A's gradient summed over TP as above.
    row-parallel W:    the partial products x_i A_i^T are reduce-scattered along the sequence (as W's output is);
        replicated B then sees this rank's slice only, so its gradient is summed over TP.

The ``tp > n_kv_heads`` replicated k/v projection is refused (adapt q/o/MLP there). Every adapter weight is drawn
whole from ``(seed, name)`` and then sliced (``init_llama_weights`` honours ``param.init_std``), so any TP size
starts from the same adapters. ``base_dtype="bf16"`` holds the frozen projection weights in bf16 (half the
memory; the projection runs in bf16, the adapter in the input's dtype).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS: dict[str, str] = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
                           "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}
"""Short target names (Hugging Face's ``q_proj`` ... ``down_proj`` without ``_proj``) -> our module paths."""
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how (the ``[lora]`` section of the stage configs mirrors these fields)."""

    rank: int = 8
    """Rank r of every adapter (A: r x in, B: out x r)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / r (so changing r keeps the step size)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    """Projections to adapt, any of q, k, v, o, gate, up, down."""
    base_dtype: str = "fp32"
    """Dtype of the frozen projection weights: "fp32" or "bf16" (half their memory)."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> LoRASpec:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets={list(self.targets)}: use some of {list(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout}: must be in [0, 1)")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype={self.base_dtype!r}: use one of {list(BASE_DTYPES)}")
        return self


# ---------------------------------------------------------------------------------------------------
# The adapter halves (plain at TP 1; the TP variants add the collectives the module docstring derives)
# ---------------------------------------------------------------------------------------------------
class LoRADown(nn.Module):
    """``A``: ``[r, in]`` (this rank's columns for a row-parallel layer); dropout on the input first.
    ``state``: the sequence-parallel layer's ``SplitState`` (None without sequence parallelism)."""

    def __init__(self, in_features: int, rank: int, *, dropout: float, tp: str, group: Any = None,
                 state: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, in_features))
        self.dropout, self.tp, self.group = nn.Dropout(dropout), tp, group
        object.__setattr__(self, "state", state)  # shared with the model's other layers, not a submodule

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.state is not None and self.state.active():  # sequence-parallel (module docstring)
            from model import comm
            from model.parallel import sum_grad_over_tp

            if self.tp == "column":  # x: this rank's slice; gathered, its gradient reduce-scattered back
                x = comm.gather_along_dim(x, dim=1, group=self.group)
                weight = sum_grad_over_tp(weight, self.group)
            h = F.linear(self.dropout(x).to(weight.dtype), weight)
            return comm.reduce_scatter_along_dim(h, dim=1, group=self.group) if self.tp == "row" else h
        if self.tp == "column":  # x replicated: its and A's gradients are sums over the ranks' output slices
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            from model.parallel import sum_grad_over_tp

            x = copy_to_tensor_model_parallel_region(x, group=self.group)
            weight = sum_grad_over_tp(weight, self.group)
        h = F.linear(self.dropout(x).to(weight.dtype), weight)
        if self.tp == "row":  # partial products over this rank's input columns: all-reduced, as W's are
            from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

            h = reduce_from_tensor_model_parallel_region(h, group=self.group)
        return h


class LoRAUp(nn.Module):
    """``B``: ``[out, r]`` (this rank's rows for a column-parallel layer), initialised to zero. Replicated ``B`` of
    a row-parallel layer under sequence parallelism (``state`` given) sees this rank's slice of the sequence only:
    its gradient is summed over TP."""

    def __init__(self, rank: int, out_features: int, *, group: Any = None, state: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, rank))
        self.group = group
        object.__setattr__(self, "state", state)

    def forward(self, h: Tensor) -> Tensor:
        weight = self.weight
        if self.state is not None and self.state.active():
            from model.parallel import sum_grad_over_tp

            weight = sum_grad_over_tp(weight, self.group)
        return F.linear(h, weight)


def _adapter_hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    x = inputs[0]
    return output + (layer.lora_B(layer.lora_A(x)) * layer.lora_scale).to(output.dtype)


def _cast_input_hook(layer: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (inputs[0].to(layer.weight.dtype), *inputs[1:])


def _cast_output_hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return output.to(layer.lora_compute_dtype)


# ---------------------------------------------------------------------------------------------------
# Applying, inspecting, merging
# ---------------------------------------------------------------------------------------------------
def _tp_kind(layer: nn.Module, path: str) -> str:
    if type(layer).__name__ == "ReplicatedKVProjection":
        raise ValueError(f"{path}: LoRA on a k/v projection replicated over TP (tp > n_kv_heads) is not supported; "
                         "drop k and v from lora.targets or lower parallel.tp to a divisor of n_kv_heads")
    return {None: "local", 0: "column", 1: "row"}[getattr(layer.weight, "tp_dim", None)]


def _attach(layer: nn.Module, spec: LoRASpec, *, kind: str, group: Any, tp_rank: int, tp_size: int) -> None:
    # ZeRO-3 (built inside ``deepspeed.zero.Init``) leaves ``weight`` an empty partition: ``ds_shape`` is its shape.
    out_local, in_local = tuple(getattr(layer.weight, "ds_shape", layer.weight.shape))
    full_out, full_in = tuple(getattr(layer.weight, "tp_full_shape", (out_local, in_local)))
    state = getattr(layer, "state", None) if tp_size > 1 else None  # a sequence-parallel layer's SplitState
    down = LoRADown(in_local, spec.rank, dropout=spec.dropout, tp=kind if tp_size > 1 else "local", group=group,
                    state=state)
    up = LoRAUp(spec.rank, out_local, group=group, state=state if kind == "row" else None)
    down.weight.init_std = 1.0 / spec.rank  # PEFT's "gaussian" init of A; B = 0 (see init_lora_weights)
    up.weight.init_std = 0.0
    if tp_size > 1 and kind in ("column", "row"):
        from model.parallel import _mark_shard

        if kind == "column":
            _mark_shard(up.weight, full_shape=(full_out, spec.rank), dim=0, rank=tp_rank, size=tp_size)
        else:
            _mark_shard(down.weight, full_shape=(spec.rank, full_in), dim=1, rank=tp_rank, size=tp_size)
    layer.lora_A, layer.lora_B, layer.lora_scale = down, up, spec.scale
    layer.needs_call = True
    layer.lora_handle = layer.register_forward_hook(_adapter_hook)


def _hold_in(layer: nn.Module, dtype: torch.dtype) -> None:
    """Keep a frozen layer's weight in ``dtype``; inputs are cast to it and outputs back."""
    layer.lora_compute_dtype = layer.weight.dtype
    layer.weight.data = layer.weight.data.to(dtype)
    layer.needs_call = True
    # Registered first (prepend) so the adapter hook sees the output already cast back.
    layer.register_forward_pre_hook(_cast_input_hook)
    layer.register_forward_hook(_cast_output_hook, prepend=True)


def apply_lora(model: nn.Module, spec: LoRASpec, *, seed: int | None = 0) -> list[str]:
    """Freeze every weight of ``model`` (a ``Llama``), attach adapters to ``spec.targets`` in every block.

    ``seed``: initialise the adapters now (A ~ N(0, 1/r) drawn whole then sliced, B = 0); None leaves them to the
    caller's ``init_llama_weights``. Returns the adapted layers' paths (``layers.0.attention.wq`` ...)."""
    spec.validate()
    tp_rank, tp_size, group = 0, 1, None
    first = model.layers[0].attention.wq
    if getattr(first.weight, "tp_dim", None) is not None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank, tp_size = (parallel_state.get_tensor_model_parallel_rank(),
                            parallel_state.get_tensor_model_parallel_world_size())
    for param in model.parameters():
        param.requires_grad_(False)
    adapted = []
    for i, block in enumerate(model.layers):
        for target in sorted(TARGETS):
            layer = block.get_submodule(TARGETS[target])
            if spec.base_dtype != "fp32":
                _hold_in(layer, BASE_DTYPES[spec.base_dtype])
            if target in spec.targets:
                path = f"layers.{i}.{TARGETS[target]}"
                _attach(layer, spec, kind=_tp_kind(layer, path), group=group, tp_rank=tp_rank, tp_size=tp_size)
                adapted.append(path)
    if seed is not None:
        init_lora_weights(model, seed=seed)
    return adapted


def llama_of(module: nn.Module) -> nn.Module:
    """The ``Llama`` inside an objective's training module (``LossModule.model``, a reward model's body ...)."""
    from model.llama import Llama

    found = [m for m in module.modules() if isinstance(m, Llama)]
    if len(found) != 1:
        raise ValueError(f"LoRA: expected one Llama inside {type(module).__name__}, found {len(found)}")
    return found[0]


def init_lora_weights(model: nn.Module, *, seed: int) -> None:
    """Only the adapters, layout-independent: the same draw as ``init_llama_weights`` gives them."""
    from model.llama import init_llama_weights

    class _Adapters(nn.Module):
        def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
            return iter(adapter_parameters(model))

    init_llama_weights(_Adapters(), seed=seed, n_layers=1)


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every adapter weight, in model order."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """This rank's adapter tensors by our names (``layers.0.attention.wq.lora_A.weight`` ...)."""
    return {n: p.detach() for n, p in adapter_parameters(model)}


def is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merged_weight(base: Tensor, lora_a: Tensor, lora_b: Tensor, *, scale: float) -> Tensor:
    """``W + scale * B A`` in fp32, returned in ``base``'s dtype (full tensors, or one rank's matching slices)."""
    return (base.float() + scale * (lora_b.float() @ lora_a.float())).to(base.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer in place (this rank's slices) and remove it; returns how many.
    The merged layer's weight goes back to the dtype it had before ``base_dtype``."""
    count = 0
    for module in model.modules():
        if not hasattr(module, "lora_A"):
            continue
        dtype = getattr(module, "lora_compute_dtype", module.weight.dtype)
        module.weight.data = merged_weight(module.weight.data.to(dtype), module.lora_A.weight, module.lora_B.weight,
                                           scale=module.lora_scale)
        module.lora_handle.remove()
        del module.lora_A, module.lora_B
        count += 1
    return count
