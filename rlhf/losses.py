"""Losses and tensor math of the alignment stage (reward models, PPO, SFT, DPO), as small pure torch functions.

Nothing here owns a model or an optimizer: every function takes tensors and returns tensors, so each one is
tested against hand-computed numbers in ``tests/unit/test_losses.py``
(``pytest tests/unit/test_losses.py``).

Conventions shared by every function:

- ``mask`` tensors mark the tokens that count (1) and the ones that don't (0: prompt, padding); they may be
  bool, int or float. Values at masked-out positions are ignored even when they are ``inf``/``nan`` (e.g. the
  log-prob of a padding token), because they are filled with 0 before any arithmetic.
- Shapes: per-sequence quantities are ``[b]``, per-token quantities ``[b, t]``, logits ``[b, t, V]``.
- Optional arguments are keyword-only (project convention: ``gae(r, v, m, gamma=1.0, lam=0.95)``);
  required ones are positional, in the order of the papers.

Sources: Llama 2 (Touvron et al. 2023) sec. 3.2.2 (ranking loss with margin) and 3.2.3 (combined reward,
WHITEN(LOGIT(.)), KL penalty); InstructGPT (Ouyang et al. 2022) for the per-token KL penalty;
PPO (Schulman et al. 2017) and GAE (Schulman et al. 2016); the masked statistics follow trl/OpenRLHF.
DPO (Rafailov et al. 2023), IPO (Azar et al. 2023), conservative DPO (Mitchell 2023), the Llama 3 variant
(Llama 3 Herd sec. 4.1.4: formatting tokens masked, NLL on the chosen answer as in Pang et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Llama 2 sec. 3.2.2: m(r) added to the ranking loss, a function of the annotators' preference rating.
# "negligibly_better" and "unsure" get no margin in both tables.
RATINGS: tuple[str, ...] = (
    "significantly_better",
    "better",
    "slightly_better",
    "negligibly_better",
    "unsure",
)
MARGIN_TABLES: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": {
        "significantly_better": 1.0,
        "better": 2.0 / 3.0,
        "slightly_better": 1.0 / 3.0,
        "negligibly_better": 0.0,
        "unsure": 0.0,
    },
    "large": {
        "significantly_better": 3.0,
        "better": 2.0,
        "slightly_better": 1.0,
        "negligibly_better": 0.0,
        "unsure": 0.0,
    },
}

KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------------------------- reward model


def margin_for(ratings: Sequence[str | None], table: str) -> Tensor:
    """Margins ``m(rating)`` for a batch of ratings, as a float32 tensor ``[len(ratings)]``.

    ``table`` is a key of ``MARGIN_TABLES`` ("none", "small", "large"). A ``None`` rating (data without
    graded preferences, e.g. HH-RLHF) gets margin 0, i.e. the plain Bradley-Terry loss.
    """
    if table not in MARGIN_TABLES:
        raise ValueError(f"unknown margin table {table!r}; choose one of {sorted(MARGIN_TABLES)}")
    values = MARGIN_TABLES[table]
    out = []
    for r in ratings:
        if r is None:
            out.append(0.0)
        elif r in values:
            out.append(values[r])
        else:
            raise ValueError(f"unknown rating {r!r}; allowed ratings are {list(RATINGS)} or None")
    return torch.tensor(out, dtype=torch.float32)


def ranking_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margins: Tensor | None = None, *,
                 reduction: str = "mean") -> Tensor:
    """Llama 2 binary ranking loss, averaged over the batch (``reduction="none"``: the ``[b]`` per-pair terms,
    which the reward-model trainer sums and normalises by the global number of pairs).

    ``L = mean_i -log(sigmoid(r_c[i] - r_r[i] - m[i]))``, with ``m = 0`` when ``margins`` is None.
    Computed as ``-logsigmoid(.)``, which stays finite for large negative differences (``log(sigmoid(x))``
    would underflow to ``log(0) = -inf`` below x ~ -100 in float32).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: use \"mean\" or \"none\"")
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen {tuple(chosen_rewards.shape)} and rejected {tuple(rejected_rewards.shape)} "
            "rewards must have the same shape"
        )
    diff = chosen_rewards - rejected_rewards
    if margins is not None:
        diff = diff - margins.to(diff)
    terms = -F.logsigmoid(diff)
    return terms if reduction == "none" else terms.mean()


# ------------------------------------------------------------------------------------------ masked statistics


def _filled(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(x with masked-out entries set to 0 so that inf/nan there cannot leak, mask as x's dtype)."""
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    return x.masked_fill(mask == 0, 0) * m, m


def masked_mean(x: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is non-zero: ``sum(x * mask) / sum(mask)``.

    With ``dim`` the mean is taken along that dimension only. An empty mask (no counted entry) gives 0
    rather than ``nan``, so that one fully padded row cannot poison a batch statistic.
    """
    xm, m = _filled(x, mask)
    num = xm.sum() if dim is None else xm.sum(dim)
    den = m.sum() if dim is None else m.sum(dim)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def masked_var(x: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked entries; unbiased (Bessel ``n / (n - 1)``) by default, as trl."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = (mask != 0).sum()
    if n < 2:
        raise ValueError(f"masked_var needs at least 2 masked entries, got {int(n)}")
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` with the mean and *unbiased* variance of its masked entries.

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back (only the scale
    changes), as trl/OpenRLHF do for rewards. The variance is unbiased (divides by ``n - 1``) as in trl and
    OpenRLHF, so the whitened masked entries have sample std exactly 1 (population std ``sqrt((n-1)/n)``).
    Entries outside the mask are returned as 0.
    """
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(mask == 0, 0)


def whiten(x: Tensor, *, eps: float = 1e-8) -> Tensor:
    """``(x - mean(x)) / sqrt(var(x) + eps)`` over all entries (unbiased variance, like ``masked_whiten``)."""
    if x.numel() < 2:
        raise ValueError(f"whiten needs at least 2 values, got {x.numel()}: whiten a batch, not one score")
    return (x - x.mean()) * torch.rsqrt(x.var(unbiased=True) + eps)


# ---------------------------------------------------------------------------------- Llama 2 PPO reward


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """Inverse sigmoid ``log(p / (1 - p))``, with ``p`` clamped to ``[eps, 1 - eps]`` so 0 and 1 stay finite."""
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def combined_reward(helpful: Tensor, safety: Tensor, is_safety: Tensor, *, threshold: float = 0.15) -> Tensor:
    """Llama 2 gated reward: ``Rc = Rs if IS_SAFETY(p) or Rs < threshold else Rh`` (elementwise).

    ``helpful``/``safety`` are the two reward models' scores as probabilities in (0, 1); ``is_safety`` marks
    prompts tagged as possibly unsafe. Safety wins on tagged prompts and whenever the answer looks unsafe.
    """
    use_safety = is_safety.bool() | (safety < threshold)
    return torch.where(use_safety, safety, helpful)


def llama2_ppo_reward(
    helpful: Tensor,
    safety: Tensor,
    is_safety: Tensor,
    *,
    threshold: float = 0.15,
    whiten: bool = True,
    scores_are_logits: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Llama 2 PPO reward ``R~c = WHITEN(LOGIT(Rc))`` per sequence, ``[b]`` (before the KL penalty).

    The reward models' scores are expected as probabilities in [0, 1] (the paper gates on ``Rs < 0.15``);
    if your reward model returns raw scalars, pass ``scores_are_logits=True`` and they are passed through
    ``sigmoid`` first. LOGIT then undoes the sigmoid, which the paper does to "reverse the sigmoid and
    increase the weight on low scores". WHITEN normalises over the batch (unbiased variance); ``whiten=False``
    returns the logits (e.g. for a batch of one).
    """
    if scores_are_logits:
        helpful, safety = torch.sigmoid(helpful), torch.sigmoid(safety)
    else:
        for name, s in (("helpful", helpful), ("safety", safety)):
            if s.numel() and (s.min() < 0 or s.max() > 1):
                raise ValueError(
                    f"{name} scores must be probabilities in [0, 1] (got min {s.min().item():.3g}, "
                    f"max {s.max().item():.3g}); pass scores_are_logits=True for raw RM outputs"
                )
    r = logit(combined_reward(helpful, safety, is_safety, threshold=threshold), eps=eps)
    return _whiten_all(r) if whiten else r


_whiten_all = whiten  # the ``whiten`` flag above shadows the function inside llama2_ppo_reward


# ------------------------------------------------------------------------------------------------------ KL


def kl_estimate(logp: Tensor, ref_logp: Tensor, *, kind: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from the log-probs of *sampled* tokens (Schulman's k1/k2/k3).

    With ``log r = ref_logp - logp`` (sampled from pi):

    - ``k1 = logp - ref_logp = -log r``: unbiased, but **negative on every token the reference likes more than
      the policy**. Its batch mean is an unbiased KL estimate, yet single tokens, single sequences and even
      small-batch means are often < 0; that is the "negative KL" users report. It is not a bug as long as
      the mean over many samples is >= 0 (a persistently negative mean means the samples are not from pi,
      e.g. logp/ref_logp computed with different temperatures or masks).
    - ``k2 = 0.5 * (log r)^2``: always >= 0, biased (exact to second order), low variance.
    - ``k3 = (r - 1) - log r``: always >= 0 and unbiased; the best monitoring estimator.

    Default use in this project: the PPO reward penalty is ``-beta * k1`` per token as in InstructGPT and
    Llama 2 (``kl_penalized_rewards``); ``k3`` is what we log to monitor the KL.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r  # expm1: exact for tiny log_r where exp(x) - 1 cancels
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {list(KL_KINDS)}")


def _last_index(mask: Tensor) -> Tensor:
    """Index of the last non-zero entry of each row of ``mask [b, t]``; ValueError for an empty row."""
    present = mask != 0
    empty = (~present.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"rows {empty} of the response mask are empty: every sequence needs >= 1 response token"
        )
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(present, positions, -1).max(dim=1).values


def kl_penalized_rewards(
    score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float, *, kind: str = "k1"
) -> Tensor:
    """Per-token PPO rewards ``[b, t]``: ``-beta * (logp - ref_logp)`` on every response token, plus the
    sequence score ``score[i]`` added at the last response token of row ``i`` (InstructGPT / Llama 2).

    ``mask`` marks response tokens (rows may have different lengths; prompt or padding positions are 0 and get
    reward 0). The k1 estimator is used because its sum over a sequence is the sequence's log-ratio, so the
    return of a sequence is exactly ``score - beta * log(pi(g|p) / pi_0(g|p))``. ``kind="k2"``/``"k3"`` use
    the always-positive estimators as the per-token penalty instead (lower variance, biased as a penalty).
    """
    rewards = -beta * kl_estimate(logp, ref_logp, kind=kind)
    rewards = rewards.masked_fill(mask == 0, 0)
    last = _last_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


# ----------------------------------------------------------------------------------------------------- PPO


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens, ``(advantages, returns)`` both ``[b, t]``.

    Backward over t: ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V_{t+1} = 0`` and ``A_{t+1} = 0`` past the last response token (the episode ends there: no
    bootstrap from padding). ``returns = A + V`` are the value targets. Each row's response must be one
    contiguous run of 1s in ``mask`` (right padding, optionally after masked prompt tokens). Outputs are 0
    outside the mask and carry no gradient (they are targets).
    """
    starts = (mask[:, :1] != 0).sum(1) + ((mask[:, 1:] != 0) & (mask[:, :-1] == 0)).sum(1)
    if (starts > 1).any():
        raise ValueError("gae: each row's mask must be one contiguous run of response tokens (right padding)")
    m = (mask != 0).to(values.dtype)
    r = rewards.detach().masked_fill(mask == 0, 0)
    v = values.detach().masked_fill(mask == 0, 0)
    advantages = torch.zeros_like(v)
    next_adv = torch.zeros_like(v[:, 0])
    next_value = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = v[:, t]
    return advantages, (advantages + v) * m


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate, ``(loss, clip_fraction, approx_kl)``, all token-level masked means.

    ``ratio = exp(logp - old_logp)``; ``loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)))``.
    ``clip_fraction`` is the share of tokens where the clipped term is the larger (gradient zeroed);
    ``approx_kl`` is the k3 estimate of ``KL(pi_old || pi)``, ``mean((ratio - 1) - log ratio) >= 0``.
    The two diagnostics are detached.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float = 0.2
) -> Tensor:
    """Clipped value loss ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` over masked tokens.

    ``V_clip = old_V + clamp(V - old_V, -clip, clip)`` keeps the critic within ``clip`` (absolute, in reward
    units) of the values used for the rollout, as in PPO2/trl/OpenRLHF; taking the max of the two squared
    errors makes it a pessimistic bound. The 0.5 makes the gradient ``(V - R)``.
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


# ---------------------------------------------------------------------------------------------- from logits


def logprobs_from_logits(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """``log softmax(logits)[..., label]`` per token, ``[b, t]`` float32 (0 where ``labels == ignore_index``).

    Computed as ``logits[label] - logsumexp(logits)``, which never materialises the ``[b, t, V]``
    log-softmax. Half-precision logits are upcast to float32 one row at a time, so the peak extra memory is
    one row's ``[t, V]`` float32 copy instead of the whole batch's.
    """
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0).unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        out = logits.gather(-1, safe).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    else:
        rows = []
        for row_logits, row_labels in zip(logits, safe, strict=True):
            row = row_logits.float()
            rows.append(row.gather(-1, row_labels).squeeze(-1) - torch.logsumexp(row, dim=-1))
        out = torch.stack(rows)
    return out.float().masked_fill(ignored, 0.0)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of the per-token entropy ``H = logsumexp(z) - sum(softmax(z) * z)`` (nats)."""
    z = logits.float()
    per_token = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return masked_mean(per_token, mask)


def sft_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Cross-entropy averaged over every token of the batch where ``loss_mask == 1`` (token-level mean).

    Convention: the caller has already shifted, so ``logits[:, t]`` is the prediction for ``labels[:, t]``
    (i.e. ``logits = model(ids)[:, :-1]``, ``labels = ids[:, 1:]``). ``loss_mask`` is 0 on prompt tokens
    (Llama 2 sec. 3.1 zeroes the loss on the prompt; GAtt zeroes it on all previous turns) and on padding.
    An all-zero mask gives loss 0.
    """
    nll = -logprobs_from_logits(logits, labels.masked_fill(loss_mask == 0, 0))
    return masked_mean(nll, loss_mask)


# ----------------------------------------------------------------------------------------------------- DPO

DPO_LOSSES: tuple[str, ...] = ("sigmoid", "ipo")


class DPOTerms(NamedTuple):
    """Per-pair DPO quantities, all ``[b]``: the loss terms and the (detached) implicit rewards."""

    losses: Tensor
    chosen_rewards: Tensor
    """``beta * (log pi(y_w|x) - log pi_ref(y_w|x))``."""
    rejected_rewards: Tensor


def sequence_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """``sum_t mask * log pi(token_t)`` per row, ``[b]`` (masked-out positions may hold inf/nan)."""
    return _filled(token_logps, mask)[0].sum(-1)


def without_formatting_tokens(labels: Tensor, mask: Tensor, formatting_ids: Sequence[int]) -> Tensor:
    """``mask`` with the positions whose label is a formatting token (header, end-of-turn ids) set to 0.

    Llama 3 masks these from both answers of the DPO loss: they are identical in chosen and rejected, and
    pushing their probabilities apart ("tail repetition, abrupt termination") hurt its models."""
    keep = torch.ones_like(labels, dtype=torch.bool)
    for token in formatting_ids:
        keep &= labels != token
    return mask * keep.to(mask.dtype) if mask.dtype != torch.bool else mask & keep


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None) -> DPOTerms:
    """DPO per pair from sequence log-probs (sums over each answer's counted tokens), ``[b]`` each.

    With ``d = beta * ((pc - rc) - (pr - rr))``:
    ``"sigmoid"``: ``-(1 - eps) log sigmoid(d) - eps log sigmoid(-d)`` (``eps = label_smoothing``: conservative
    DPO, noisy preference labels; 0 = plain DPO). ``"ipo"``: ``(hc / nc - hr / nr - 1 / (2 beta))^2`` with
    ``h = policy - ref`` and ``n`` the answers' token counts (``chosen_tokens``/``rejected_tokens``; the per-token
    normalisation TRL uses, confirmed by the IPO authors), without counts the paper's unnormalised form.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo loss_type={loss_type!r}: use one of {list(DPO_LOSSES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 0.5)")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        d = beta * (chosen_ratio - rejected_ratio)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    else:
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only; IPO has no label noise term")
        if chosen_tokens is not None and rejected_tokens is not None:
            chosen_ratio = chosen_ratio / chosen_tokens.to(chosen_ratio).clamp(min=1.0)
            rejected_ratio = rejected_ratio / rejected_tokens.to(rejected_ratio).clamp(min=1.0)
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return DPOTerms(losses, beta * (policy_chosen - ref_chosen).detach(),
                    beta * (policy_rejected - ref_rejected).detach())


def chosen_nll(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Length-normalised NLL of the chosen answers, ``-log pi(y_w|x) / |y_w|`` per pair ``[b]`` (Pang et al.
    2024; Llama 3 adds it to DPO with weight 0.2)."""
    return -chosen_logps / chosen_tokens.to(chosen_logps).clamp(min=1.0)


__all__ = [
    "DPO_LOSSES",
    "KL_KINDS",
    "MARGIN_TABLES",
    "RATINGS",
    "DPOTerms",
    "chosen_nll",
    "combined_reward",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "kl_estimate",
    "kl_penalized_rewards",
    "llama2_ppo_reward",
    "logit",
    "logprobs_from_logits",
    "margin_for",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "ranking_loss",
    "sequence_logps",
    "sft_loss",
    "value_loss",
    "whiten",
    "without_formatting_tokens",
]
