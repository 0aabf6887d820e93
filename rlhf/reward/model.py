"""The reward model (Llama 2 sec. 3.2.2): the scalar-head model (``rlhf.scalar_head``) trained with the margin
ranking loss, and its engine objective.

    module = RewardModel(Llama(cfg))                 # reward_head reads the answer's last token
    scores = module.scores(input_ids, score_index)   # [B] fp32
    model, meta = load_reward_model("runs/rm")       # a run directory means its final_model/

The head reads the final-norm hidden state at the answer's last token (its end-of-turn token, which has attended
to the whole answer). The export (``reward_model.safetensors`` + ``reward_model.json``) is
``rlhf.scalar_head.write_scalar_model``'s (streamed), the one the PPO value model writes too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.llama import Llama
from rlhf.losses import ranking_loss
from rlhf.scalar_head import ScalarHeadModel, load_scalar_model, native_name


class RewardModel(ScalarHeadModel):
    """The scalar-head model whose ``forward`` gives the pair scores or the scaled ranking-loss sum."""

    def forward(self, input_ids: Tensor, score_index: Tensor, margin: Tensor | None = None,
                pair_weight: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """Rows ``0..B-1`` chosen, ``B..2B-1`` rejected (``rlhf.batching.collate_pairs``). Without ``scale``:
        the ``[2B]`` scores; with it: ``sum_i w_i * -log sigmoid(r_c - r_r - m) * scale``."""
        r = self.scores(input_ids, score_index)
        if scale is None:
            return r
        b = r.shape[0] // 2
        losses = ranking_loss(r[:b], r[b:], margin, reduction="none")
        weight = pair_weight.to(losses) if pair_weight is not None else torch.ones_like(losses)
        return (losses * weight).sum() * scale


class RewardObjective:
    """The engine objective of reward-model training (see ``train.objective.LanguageModelObjective``)."""

    input_keys: tuple[str, ...] = ("input_ids", "score_index", "margin", "pair_weight")
    weight_key: str = "pair_weight"
    supports_pipeline: bool = False  # the pipeline stages end in the LM head; TP and ZeRO 1-3 work
    supports_sequence_parallel: bool = True  # the head reads Llama(return_hidden=True): gathered whole
    sequence_keys: tuple[str, ...] = ("input_ids",)  # score_index points before any padding

    def wrap(self, model: Llama, *, layers: Any) -> nn.Module:
        return RewardModel(model)

    def native_name(self, name: str) -> str:
        return native_name(name)


def load_reward_model(path: str | Path) -> tuple[RewardModel, dict[str, Any]]:
    """``(RewardModel in eval mode, its reward_model.json)`` from an export (or the run dir holding it)."""
    return load_scalar_model(path, module_cls=RewardModel)
