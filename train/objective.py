"""The ``Objective`` protocol, the language-model objective and optimizer grouping, shared by the DeepSpeed engine
and the plain reference.

    objective = LanguageModelObjective()                                # what the engines train by default
    module = objective.wrap(model, layers=LocalLayers())                # done by train.parallelize
    loss_sum = masked_loss_sum(logits, labels, loss_mask, tp_size=1)    # sum of token losses under the mask
    groups = decay_groups(model, weight_decay=0.1)                      # AdamW parameter groups

No DeepSpeed here: ``train/reference.py`` (the exactness reference) must not depend on the engine it checks.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

from model.layers import LayerFactory
from model.llama import Llama


def masked_loss_sum(logits: Tensor, labels: Tensor, loss_mask: Tensor, *, tp_size: int) -> Tensor:
    """Sum over tokens of ``loss_mask * cross_entropy`` in fp32; vocab-parallel logits when ``tp_size > 1``."""
    if tp_size == 1:
        ce = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    else:
        from model.parallel import token_cross_entropy

        ce = token_cross_entropy(logits, labels, tp_size=tp_size).flatten()
    return (ce * loss_mask.flatten().float()).sum()


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (linear, embedding), none on norm gains (Llama's practice).
    Only trainable parameters (LoRA freezes the base: its optimizer state is the adapters' alone); empty groups
    are left out. A ZeRO-3 parameter built partitioned has an empty ``shape``: its ``ds_shape`` decides."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trainable]
    groups = [{"params": [p for p, m in zip(trainable, matrix) if m], "weight_decay": weight_decay},
              {"params": [p for p, m in zip(trainable, matrix) if not m], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class LossModule(nn.Module):
    """The non-pipelined language-model training module: Llama forward + token cross entropy, summed, scaled."""

    def __init__(self, model: Llama, *, tp_size: int, document_mask: bool = True) -> None:
        super().__init__()
        self.model, self.tp_size, self.document_mask = model, tp_size, document_mask

    def forward(self, input_ids: Tensor, labels: Tensor, loss_mask: Tensor, document_ids: Tensor,
                scale: Tensor, positions: Tensor | None = None) -> Tensor:
        """``positions``: the global positions of a context-parallel rank's chunks (default 0..s-1)."""
        logits = self.model(input_ids, positions=positions,
                            document_ids=document_ids if self.document_mask else None)
        return masked_loss_sum(logits, labels, loss_mask, tp_size=self.tp_size) * scale


class Objective(Protocol):
    """What to train: how to wrap the model, which batch fields feed it, how its parameters are named.

    ``wrap(model, layers=)`` returns a module whose ``forward(**inputs, scale)`` returns the *sum* of per-item
    losses times ``scale`` (and, without ``scale``, whatever the objective scores: rewards, values).
    ``weight_key`` names the batch field whose sum counts the items, so the engine can normalise by the global
    count. The model is built, tensor-parallel, and checkpointed by ``train.parallelize``; an objective only
    wraps it (``layers`` gives the TP size and group for vocab-parallel losses).
    """

    input_keys: tuple[str, ...]
    """Batch fields passed to the module's forward."""
    weight_key: str
    """Batch field whose global sum normalises the loss (tokens, pairs)."""
    supports_pipeline: bool
    """Whether the objective runs under pipeline parallelism (the stages end in the LM head)."""
    supports_sequence_parallel: bool
    """Whether it runs under Megatron sequence parallelism (``train.parallelize.sequence_parallel_obstacle``): its
    module reads logits or ``Llama(return_hidden=True)``, which are whole sequences again under the split."""
    sequence_keys: tuple[str, ...]
    """The ``[b, s, ...]`` input fields the engine may pad with zeros (masked positions) to a multiple of TP under
    sequence parallelism (``train.parallelize.pad_sequence_keys``)."""

    def wrap(self, model: Llama, *, layers: LayerFactory) -> nn.Module: ...

    def native_name(self, name: str) -> str:
        """The plain ``Llama`` (or export) name of one of the wrapped module's parameters."""
        ...


class LanguageModelObjective:
    """Next-token prediction under a loss mask (pretraining, SFT, GAtt): the default objective.

    ``document_mask``: packed documents do not attend to each other (the engine passes ``data.document_mask``).
    """

    input_keys: tuple[str, ...] = ("input_ids", "labels", "loss_mask", "document_ids")
    weight_key: str = "loss_mask"
    supports_pipeline: bool = True
    supports_sequence_parallel: bool = True
    sequence_keys: tuple[str, ...] = input_keys

    def __init__(self, *, document_mask: bool = True) -> None:
        self.document_mask = document_mask

    def wrap(self, model: Llama, *, layers: LayerFactory) -> nn.Module:
        return LossModule(model, tp_size=layers.tp_size, document_mask=self.document_mask)

    def native_name(self, name: str) -> str:
        return name.removeprefix("model.")
