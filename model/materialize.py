"""Build a module without drawing its weights: on the ``meta`` device, then empty storage on the real one.

    from model.materialize import build_unfilled
    model = build_unfilled(lambda: Llama(cfg, layers=layers), device="cpu")   # nothing drawn, nothing copied
    init_llama_weights(model, seed=...)   # or a checkpoint's slices: every parameter is then written once

Why: ``nn.Linear`` and ``nn.Embedding`` run torch's default initialisation in their ``__init__`` (Kaiming-uniform,
normal), and the engine then overwrites every weight with its seeded, layout-independent init or a checkpoint's
slices. At 70B that is billions of random numbers drawn per rank only to be thrown away (minutes of start-up at
the sizes users run). Built under ``torch.device("meta")`` the modules allocate and draw nothing; ``materialize``
then gives each parameter uninitialised storage on ``device`` (like torchtitan's ``to_empty`` + ``init_weights``).

Unlike ``nn.Module.to_empty`` it keeps every ``Parameter`` object itself (``torch.utils.swap_tensors``): the
tensor-parallel layers hang attributes on their weights (``tp_shard``, megatron's ``tensor_model_parallel``,
LoRA's ``init_std``) and a tied head shares the embedding's object, which ``to_empty`` would replace with fresh,
untied parameters without them.

The storage is uninitialised: the caller must write every parameter (the engine's seeded init or checkpoint load
do, and its parity tests compare every weight with a plain seeded ``Llama``). A tensor held as a plain attribute
that is still on ``meta`` afterwards (a table computed in ``__init__``) is an error naming it, not garbage later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.overrides import TorchFunctionMode

ModuleT = TypeVar("ModuleT", bound=nn.Module)


_NN_INIT = frozenset({init.normal_, init.uniform_, init.trunc_normal_, init.kaiming_uniform_, init.kaiming_normal_,
                      init.xavier_uniform_, init.xavier_normal_, init.zeros_, init.ones_, init.constant_})
"""``torch.nn.init``'s fills: under a torch-function mode they dispatch as themselves, tensor by keyword."""


class skipped_default_init(TorchFunctionMode):  # noqa: N801 (used as a context manager, like torch.no_grad)
    """Within it, ``torch.nn.init``'s fills do nothing, on any device: modules built in it (``nn.Linear``,
    ``nn.Embedding``) keep uninitialised storage, because the engine writes every weight afterwards (the seeded
    init, a checkpoint) and torch's random draws would be thrown away. Used by ``build_unfilled`` on meta (there a
    meta ``normal_`` would also run torch's Python reference, which imports ``torch._dynamo``: seconds per
    process) and around ZeRO-3's ``deepspeed.zero.Init`` (each module built whole in real memory, then
    partitioned). Only the ``torch.nn.init`` functions are skipped, never a tensor op (partitioning copies run)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _NN_INIT:
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **kwargs)


def build_unfilled(build: Callable[[], ModuleT], *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> ModuleT:
    """``build()`` on the meta device, then ``materialize`` on ``device`` (in ``dtype`` when given)."""
    with torch.device("meta"), skipped_default_init():
        module = build()
    return materialize(module, device=device, dtype=dtype)


def materialize(module: ModuleT, *, device: str | torch.device, dtype: torch.dtype | None = None) -> ModuleT:
    """Give every meta parameter and buffer of ``module`` uninitialised storage on ``device``, in place (the same
    ``Parameter`` objects, attributes and ties kept). Floating-point tensors take ``dtype`` when given."""
    seen: set[int] = set()
    for owner in module.modules():
        for tensors in (owner._parameters, owner._buffers):
            for key, tensor in tensors.items():
                if tensor is None or id(tensor) in seen or not tensor.is_meta:
                    continue
                seen.add(id(tensor))
                kind = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                storage = torch.empty(tensor.shape, dtype=kind, device=device)
                if isinstance(tensor, nn.Parameter):
                    storage = nn.Parameter(storage, requires_grad=tensor.requires_grad)
                    storage.__dict__.update(tensor.__dict__)
                    torch.utils.swap_tensors(tensor, storage)  # the object stays; its data is now real
                else:
                    tensors[key] = storage
    _refuse_meta_attributes(module)
    return module


def _refuse_meta_attributes(module: nn.Module) -> None:
    for name, owner in module.named_modules():
        for attr, value in vars(owner).items():
            if isinstance(value, Tensor) and value.is_meta:
                raise RuntimeError(f"{type(owner).__name__} {name or '(root)'}.{attr} is a tensor computed in "
                                   "__init__ and still on the meta device: compute it with an explicit device "
                                   "(like model/rope.py's tables) so that meta construction can build the module")
