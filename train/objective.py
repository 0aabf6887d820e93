"""The language-model objective and optimizer grouping, shared by the DeepSpeed engine and the plain reference.

    objective = LanguageModelObjective()                                # what the engines train by default
    loss_sum = masked_loss_sum(logits, labels, loss_mask, tp_size=1)    # sum of token losses under the mask
    groups = decay_groups(model, weight_decay=0.1)                      # AdamW parameter groups

No DeepSpeed here: ``train/reference.py`` (the exactness reference) must not depend on the engine it checks.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from model.config import LlamaConfig
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
    """AdamW groups: weight decay on matrices (linear, embedding), none on norm gains (Llama's practice)."""
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LossModule(nn.Module):
    """The non-pipelined language-model training module: Llama forward + token cross entropy, summed, scaled."""

    def __init__(self, model: Llama, *, tp_size: int, document_mask: bool = True) -> None:
        super().__init__()
        self.model, self.tp_size, self.document_mask = model, tp_size, document_mask

    def forward(self, input_ids: Tensor, labels: Tensor, loss_mask: Tensor, document_ids: Tensor,
                scale: Tensor) -> Tensor:
        logits = self.model(input_ids, document_ids=document_ids if self.document_mask else None)
        return masked_loss_sum(logits, labels, loss_mask, tp_size=self.tp_size) * scale


class LanguageModelObjective:
    """Next-token prediction under a loss mask (pretraining, SFT, GAtt): the default objective.

    An objective tells the engine what module to train and which batch fields feed it. Its module's
    ``forward(**inputs, scale)`` returns the *sum* of per-item losses times ``scale``; ``weight_key`` names
    the batch field whose sum counts the items (tokens here), so the engine can normalise by the global count.
    Other objectives (the reward model's pairwise loss in ``rlhf/``) implement the same three members.
    """

    input_keys: tuple[str, ...] = ("input_ids", "labels", "loss_mask", "document_ids")
    weight_key: str = "loss_mask"
    supports_pipeline: bool = True

    def build_module(self, model_cfg: LlamaConfig, factory: LayerFactory, run_cfg: Any) -> nn.Module:
        model = Llama(model_cfg, layers=factory)
        model.checkpoint_every = run_cfg.parallel.activation_checkpoint_every
        return LossModule(model, tp_size=factory.tp_size, document_mask=run_cfg.data.document_mask)

    def native_name(self, name: str) -> str:
        return name.removeprefix("model.")
