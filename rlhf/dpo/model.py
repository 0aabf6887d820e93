"""The DPO training module and its engine objective: policy log-probs of both answers, the DPO loss, metrics.

    module = DPOModule(Llama(cfg), tp_size=1, loss=DPOLossSettings(beta=0.1, nll_weight=0.2))
    logps = module(input_ids, labels, loss_mask, dpo_mask)                   # [2B] sequence log-probs (scoring)
    loss = module(input_ids, labels, loss_mask, dpo_mask, ref_logps, pair_weight, scale=s)   # training

Batch layout (``rlhf.dpo.train.collate_dpo``): rows ``0..B-1`` are the chosen answers, ``B..2B-1`` the rejected
ones, each the prompt + answer in the chat format, shifted (``labels[t]`` is the token after ``input_ids[t]``);
``loss_mask`` marks the answer's tokens (with its end-of-turn token), ``dpo_mask`` the ones the DPO term counts
(``loss_mask`` minus formatting tokens when ``dpo.mask_formatting_tokens``), ``ref_logps`` the frozen
reference's sums over ``dpo_mask``. The engine contract (``train.objective``): with ``scale`` the forward returns
``sum_i w_i * loss_i * scale`` and the engine divides by the global number of pairs (``weight_key``).

Tensor parallelism: the logits are vocab-parallel and the log-probs come from megatron-core's vocab-parallel
cross entropy (``rlhf.ppo.roles.token_logprobs``): no rank gathers ``[2B, T, V]``. Metrics (implicit rewards,
margins, accuracy, log-probs) are summed per training micro-batch in ``module.stats`` and reduced over the DP
group once per step by ``rlhf.dpo.train.DPOTask.step_metrics``.

Pipeline parallelism: DeepSpeed's ``PipelineModule`` (``train.parallelize``) runs the stages; the last one calls
``DPOPipelineLoss`` with the logits and the targets the objective names (``pipeline_target_keys``), which runs the
same ``dpo_loss_sum`` as the plain module and keeps the metrics (summed over the PP group by ``step_metrics``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model.llama import Llama
from rlhf.losses import chosen_nll, dpo_loss, sequence_logps
from rlhf.ppo.roles import token_logprobs

STAT_KEYS = ("loss", "dpo_loss", "nll", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
             "logp_chosen", "logp_rejected")


@dataclass(frozen=True)
class DPOLossSettings:
    """The ``[dpo]`` loss fields (see ``rlhf.dpo.config.DPOSection``)."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    nll_weight: float = 0.0


class DPOModule(nn.Module):
    """A Llama whose forward scores answers (sequence log-probs) or returns the scaled DPO loss sum."""

    def __init__(self, model: Llama, *, tp_size: int, loss: DPOLossSettings) -> None:
        super().__init__()
        self.model, self.tp_size, self.settings = model, tp_size, loss
        self.stats: dict[str, float] = defaultdict(float)

    def forward(self, input_ids: Tensor, labels: Tensor, loss_mask: Tensor, dpo_mask: Tensor,
                ref_logps: Tensor | None = None, pair_weight: Tensor | None = None,
                scale: Tensor | None = None) -> Tensor:
        token_logps = token_logprobs(self.model(input_ids), labels, tp_size=self.tp_size)
        if scale is None:
            return sequence_logps(token_logps, dpo_mask).detach()
        if ref_logps is None or pair_weight is None:
            raise ValueError("DPOModule: training needs ref_logps and pair_weight (rlhf.dpo.train.collate_dpo)")
        return dpo_loss_sum(token_logps, loss_mask, dpo_mask, ref_logps, pair_weight, scale, settings=self.settings,
                            stats=self.stats if self.training else None)

    def pop_stats(self) -> dict[str, float]:
        out, self.stats = dict(self.stats), defaultdict(float)
        return out


def dpo_loss_sum(token_logps: Tensor, loss_mask: Tensor, dpo_mask: Tensor, ref_logps: Tensor, pair_weight: Tensor,
                 scale: Tensor, *, settings: DPOLossSettings, stats: dict[str, float] | None) -> Tensor:
    """``sum_i w_i * loss_i * scale`` over the pairs of one micro-batch (rows ``0..B-1`` chosen, ``B..2B-1``
    rejected) from per-token log-probs; adds the pair-weighted metric sums to ``stats`` when given. Shared by the
    plain module and the last pipeline stage, so both layouts compute the very same arithmetic."""
    logps = sequence_logps(token_logps, dpo_mask)
    b, s = logps.shape[0] // 2, settings
    counts = dpo_mask.sum(-1)
    terms = dpo_loss(logps[:b], logps[b:], ref_logps[:b].to(logps), ref_logps[b:].to(logps), beta=s.beta,
                     loss_type=s.loss, label_smoothing=s.label_smoothing, chosen_tokens=counts[:b],
                     rejected_tokens=counts[b:])
    losses = terms.losses
    nll = torch.zeros_like(losses)
    if s.nll_weight:
        nll = chosen_nll(sequence_logps(token_logps[:b], loss_mask[:b]), loss_mask[:b].sum(-1))
        losses = losses + s.nll_weight * nll
    weight = pair_weight.to(losses)
    if stats is not None:
        _record(stats, weight, losses, terms, nll, logps)
    return (losses * weight).sum() * scale


@torch.no_grad()
def _record(stats: dict[str, float], weight: Tensor, losses: Tensor, terms: Any, nll: Tensor, logps: Tensor) -> None:
    b = weight.shape[0]
    values = {"loss": losses, "dpo_loss": terms.losses, "nll": nll, "reward_chosen": terms.chosen_rewards,
              "reward_rejected": terms.rejected_rewards, "reward_margin": terms.chosen_rewards - terms.rejected_rewards,
              "reward_accuracy": (terms.chosen_rewards > terms.rejected_rewards).to(weight),
              "logp_chosen": logps[:b], "logp_rejected": logps[b:]}
    for key, v in values.items():
        stats[key] += float((v.detach().to(weight) * weight).sum())
    stats["pairs"] += float(weight.sum())


class DPOPipelineLoss:
    """The last pipeline stage's loss (DeepSpeed's ``loss_fn``): ``(logits, targets)`` -> the scaled DPO loss sum
    when ``targets`` = ``(labels, loss_mask, dpo_mask, ref_logps, pair_weight, scale)``, or the ``[2B]`` sequence
    log-probs when ``targets`` = ``(labels, loss_mask, dpo_mask)`` (scoring: reference log-probs, held-out pairs).
    Metrics are recorded only with gradients on (training, not DeepSpeed's ``eval_batch``)."""

    def __init__(self, *, tp_size: int, settings: DPOLossSettings) -> None:
        self.tp_size, self.settings = tp_size, settings
        self.stats: dict[str, float] = defaultdict(float)

    def __call__(self, logits: Tensor, targets: tuple[Tensor, ...]) -> Tensor:
        labels, loss_mask, dpo_mask, *rest = targets
        token_logps = token_logprobs(logits, labels, tp_size=self.tp_size)
        if not rest:
            return sequence_logps(token_logps, dpo_mask).detach()
        ref_logps, pair_weight, scale = rest
        return dpo_loss_sum(token_logps, loss_mask, dpo_mask, ref_logps, pair_weight, scale, settings=self.settings,
                            stats=self.stats if torch.is_grad_enabled() else None)

    def pop_stats(self) -> dict[str, float]:
        out, self.stats = dict(self.stats), defaultdict(float)
        return out


class DPOObjective:
    """The engine objective of DPO (see ``train.objective.LanguageModelObjective`` for the contract)."""

    input_keys: tuple[str, ...] = ("input_ids", "labels", "loss_mask", "dpo_mask", "ref_logps", "pair_weight")
    weight_key: str = "pair_weight"
    supports_pipeline: bool = True
    supports_sequence_parallel: bool = True  # the logits come from the SP head (sequence gathered)
    sequence_keys: tuple[str, ...] = ("input_ids", "labels", "loss_mask", "dpo_mask")  # padding: masks 0
    pipeline_target_keys: tuple[str, ...] = ("labels", "loss_mask", "dpo_mask", "ref_logps", "pair_weight")
    """What the last pipeline stage's loss receives besides the logits (``train.engine``: then ``scale``)."""
    pipeline_dynamic_shape: bool = True
    """Micro-batches are padded to their own longest pair, so the activation shape changes between them."""

    def __init__(self, settings: DPOLossSettings) -> None:
        self.settings = settings

    def wrap(self, model: Llama, *, layers: Any) -> nn.Module:
        return DPOModule(model, tp_size=getattr(layers, "tp_size", 1), loss=self.settings)

    def pipeline_loss(self, *, tp_size: int) -> DPOPipelineLoss:
        return DPOPipelineLoss(tp_size=tp_size, settings=self.settings)

    def native_name(self, name: str) -> str:
        return name.removeprefix("model.")
