"""The pretraining objective and optimizer grouping, shared by the DeepSpeed engine and the plain reference.

    loss_sum = masked_loss_sum(logits, labels, loss_mask, tp_size=1)    # sum of token losses under the mask
    groups = decay_groups(model, weight_decay=0.1)                      # AdamW parameter groups

No DeepSpeed here: ``train/reference.py`` (the exactness reference) must not depend on the engine it checks.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


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
