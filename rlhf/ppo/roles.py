"""PPO's roles as training-engine objectives: the policy (log-probs, clipped surrogate) and the value model (the
scalar-head model of ``rlhf.scalar_head`` with the clipped value loss), each trainable or frozen under TP x ZeRO.
Frozen reward models are ``rlhf.reward.model.RewardObjective`` engines.

    policy = TrainEngine(model_cfg=m, engine_cfg=cfg.engine_config(role="policy"), topology=topo,
                         objective=PolicyObjective(clip=0.2, temperature=1.0), init_weights=sft_weights)
    logp = policy.forward(input_ids=ids, labels=labels)                 # [b, t] log pi(label | prefix)
    value = TrainEngine(..., objective=ValueObjective(clip=0.2))
    v = value.forward(input_ids=ids)                                    # [b, t] V(prefix)

Both modules follow the engine's objective contract: ``forward(**batch, scale)`` returns the SUM of per-token
losses times ``scale`` (the engine divides by the global count of ``response_mask`` tokens, so a step's loss is
the token-level mean over the whole minibatch on every data-parallel rank); without ``scale`` they score.
The per-micro-batch diagnostics (clip fraction, approximate KL, entropy) are summed in ``module.stats``.

Tensor parallelism: the head's logits are vocab-parallel; log-probs come from megatron-core's
``vocab_parallel_cross_entropy`` and the entropy from three all-reduces (``vocab_parallel_entropy``), so the
full ``[b, t, V]`` logits are never gathered. Sequence parallelism (``model/sequence_parallel.py``) runs both trained roles:
the logits and the value head's hidden states are whole sequences again, the engine pads a minibatch to a
multiple of TP (``sequence_keys``: zeros, masked by ``response_mask``); scoring and generation run without
autograd, so as plain TP.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from model import comm
from model.llama import Llama
from rlhf.losses import logprobs_from_logits, policy_loss, value_loss
from rlhf.scalar_head import ScalarHeadModel, native_name


def token_logprobs(logits: Tensor, labels: Tensor, *, tp_size: int) -> Tensor:
    """``log softmax(logits)[label]`` per token, fp32 ``[b, t]``; ``logits`` vocab-parallel when ``tp_size > 1``
    (then fp32 ``logits`` are overwritten: megatron's ``vocab_parallel_cross_entropy`` works in place)."""
    if tp_size == 1:
        return logprobs_from_logits(logits, labels)
    from model.parallel import token_cross_entropy

    return -token_cross_entropy(logits, labels, tp_size=tp_size)


@torch.no_grad()
def vocab_parallel_entropy(logits: Tensor, *, tp_size: int, group: Any = None) -> Tensor:
    """Per-token entropy ``logsumexp(z) - sum softmax(z) z`` (nats, ``[b, t]``) of full or vocab-parallel logits."""
    z = logits.float()
    m = z.max(dim=-1).values
    if tp_size > 1:
        comm.all_reduce(m, op="max", group=group)
    e = torch.exp(z - m.unsqueeze(-1))
    s, ez = e.sum(-1), (e * z).sum(-1)
    if tp_size > 1:
        both = torch.stack([s, ez])
        comm.all_reduce(both, group=group)
        s, ez = both[0], both[1]
    return m + torch.log(s) - ez / s


class _Stats:
    """Sums of per-micro-batch diagnostics, weighted by their token counts (read and reset per iteration)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, n: float, **values: float) -> None:
        self.sums["tokens"] += n
        for k, v in values.items():
            self.sums[k] += float(v) * n

    def pop(self) -> dict[str, float]:
        out, self.sums = dict(self.sums), defaultdict(float)
        return out


class PolicyModule(nn.Module):
    """A Llama whose forward scores (log-probs), trains (clipped surrogate) or takes one generation step."""

    def __init__(self, model: Llama, *, tp_size: int, tp_group: Any, clip: float, temperature: float) -> None:
        super().__init__()
        self.model, self.tp_size, self.tp_group = model, tp_size, tp_group
        self.clip, self.temperature = clip, temperature
        self.stats = _Stats()

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, response_mask: Tensor | None = None,
                old_logp: Tensor | None = None, advantages: Tensor | None = None, scale: Tensor | None = None,
                *, positions: Tensor | None = None, cache: Any = None) -> Tensor:
        if cache is not None:  # one generate() step through the engine (ZeRO-3 per-token mode)
            hidden = self.model(input_ids, positions=positions, cache=cache, return_hidden=True)
            return self.model.output(hidden[:, -1:])
        logits = self.model(input_ids)
        if self.temperature != 1.0:  # PPO's log-probs are those of the sampling distribution
            logits = logits / self.temperature
        if scale is None:
            return token_logprobs(logits, labels, tp_size=self.tp_size)
        # Before the log-probs: megatron's vocab-parallel cross entropy rewrites its fp32 input in place.
        entropy = vocab_parallel_entropy(logits.detach(), tp_size=self.tp_size, group=self.tp_group)
        logp = token_logprobs(logits, labels, tp_size=self.tp_size)
        loss, clip_fraction, approx_kl = policy_loss(logp, old_logp, advantages, response_mask, clip=self.clip)
        n = response_mask.float().sum()
        m = response_mask.float()
        self.stats.add(float(n), policy_loss=float(loss.detach()), clip_fraction=float(clip_fraction),
                       approx_kl=float(approx_kl),
                       entropy=float((entropy * m).sum() / n.clamp(min=1)))
        return loss * n * scale


class PolicyObjective:
    """The policy (and the frozen reference policy): next-token log-probs and the PPO clipped surrogate."""

    input_keys: tuple[str, ...] = ("input_ids", "labels", "response_mask", "old_logp", "advantages")
    weight_key: str = "response_mask"
    supports_pipeline: bool = False
    supports_sequence_parallel: bool = True  # the log-probs read the SP head's logits (sequence gathered)
    sequence_keys: tuple[str, ...] = input_keys  # padding: response_mask 0 (masked means)

    def __init__(self, *, clip: float = 0.2, temperature: float = 1.0) -> None:
        self.clip, self.temperature = clip, temperature

    def wrap(self, model: Llama, *, layers: Any) -> nn.Module:
        return PolicyModule(model, tp_size=layers.tp_size, tp_group=getattr(layers, "group", None),
                            clip=self.clip, temperature=self.temperature)

    def native_name(self, name: str) -> str:
        return name.removeprefix("model.")


class ValueModel(ScalarHeadModel):
    """The value model: the scalar-head model (``rlhf.scalar_head``) whose ``forward`` gives the values ``[b, t]``
    or the scaled clipped value loss."""

    def __init__(self, model: Llama, *, clip: float) -> None:
        super().__init__(model)
        self.clip = clip
        self.stats = _Stats()

    def forward(self, input_ids: Tensor, response_mask: Tensor | None = None, old_values: Tensor | None = None,
                returns: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        values = self.values(input_ids)
        if scale is None:
            return values
        loss = value_loss(values, old_values, returns, response_mask, clip=self.clip)
        n = response_mask.float().sum()
        self.stats.add(float(n), value_loss=float(loss.detach()))
        return loss * n * scale


class ValueObjective:
    """The value model, trained with the clipped value loss (frozen reward models use ``RewardObjective``)."""

    input_keys: tuple[str, ...] = ("input_ids", "response_mask", "old_values", "returns")
    weight_key: str = "response_mask"
    supports_pipeline: bool = False
    supports_sequence_parallel: bool = True  # the head reads Llama(return_hidden=True): gathered whole
    sequence_keys: tuple[str, ...] = input_keys

    def __init__(self, *, clip: float = 0.2) -> None:
        self.clip = clip

    def wrap(self, model: Llama, *, layers: Any) -> nn.Module:
        return ValueModel(model, clip=self.clip)

    def native_name(self, name: str) -> str:
        return native_name(name)
