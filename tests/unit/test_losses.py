"""Hand-computed checks of every function in rlhf/losses.py (run: ``pytest tests/unit/test_losses.py``).

Expected numbers are written out or computed with the ``math`` module / plain Python loops, never by calling
the code under test.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from rlhf import losses
from rlhf.losses import (
    MARGIN_TABLES,
    combined_reward,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    llama2_ppo_reward,
    logit,
    logprobs_from_logits,
    margin_for,
    masked_mean,
    masked_whiten,
    policy_loss,
    ranking_loss,
    sft_loss,
    value_loss,
    whiten,
)

pytestmark = pytest.mark.timeout(60)


def close(actual: torch.Tensor | float, expected: float | list, tol: float = 1e-5) -> None:
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.allclose(a, e, atol=tol, rtol=0), (a.tolist(), e.tolist())


def neg_log_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


# ----------------------------------------------------------------------------------------------- reward model


def test_margin_tables_match_llama2() -> None:
    assert MARGIN_TABLES["small"] == {
        "significantly_better": 1.0,
        "better": 2 / 3,
        "slightly_better": 1 / 3,
        "negligibly_better": 0.0,
        "unsure": 0.0,
    }
    assert list(MARGIN_TABLES["large"].values()) == [3.0, 2.0, 1.0, 0.0, 0.0]
    assert set(MARGIN_TABLES["none"].values()) == {0.0}


def test_margin_for_values_and_errors() -> None:
    close(margin_for(["better", None, "significantly_better", "unsure"], "small"), [2 / 3, 0.0, 1.0, 0.0])
    close(margin_for(["slightly_better", "better"], "large"), [1.0, 2.0])
    close(margin_for(["better"], "none"), [0.0])
    with pytest.raises(ValueError, match=r"'much_better'.*significantly_better"):
        margin_for(["much_better"], "small")
    with pytest.raises(ValueError, match="unknown margin table 'huge'"):
        margin_for(["better"], "huge")


def test_ranking_loss_hand_values() -> None:
    # rc=1, rr=0, m=1/3 -> -log(sigmoid(2/3)) = log(1 + exp(-2/3)) = log(1.51342) = 0.41437
    loss = ranking_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1 / 3]))
    close(loss, neg_log_sigmoid(2 / 3))
    assert abs(loss.item() - 0.41437) < 1e-4
    # Batch mean, margins from ratings; no margin for the unrated pair.
    m = margin_for(["slightly_better", None], "small")
    loss = ranking_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.5]), m)
    close(loss, (neg_log_sigmoid(2 / 3) + neg_log_sigmoid(-1.0)) / 2)
    close(ranking_loss(torch.tensor([0.0]), torch.tensor([0.0])), math.log(2))


def test_ranking_loss_is_stable_and_checks_shapes() -> None:
    loss = ranking_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert torch.isfinite(loss) and abs(loss.item() - 200.0) < 1e-3
    rc = torch.tensor([-200.0], requires_grad=True)
    ranking_loss(rc, torch.tensor([0.0])).backward()
    close(rc.grad, [-1.0])  # d/dx -log sigmoid(x) = sigmoid(x) - 1 -> -1 for very negative x
    with pytest.raises(ValueError, match="same shape"):
        ranking_loss(torch.zeros(2), torch.zeros(3))


# ------------------------------------------------------------------------------------------ masked statistics


def test_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_mean(x, mask.bool(), dim=1), [1.5, 4.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not nan
    close(masked_mean(x, torch.tensor([[1, 1, 0], [0, 0, 0]]), dim=1), [1.5, 0.0])


def test_masked_whiten_and_whiten() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1.
    close(masked_whiten(x, mask), [-1.0, 0.0, 1.0, 0.0])
    close(masked_whiten(x, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0])
    y = [0.3, -1.2, 4.0, 2.5, 0.0]
    mu, sd = statistics.mean(y), statistics.stdev(y)  # stdev = unbiased
    close(whiten(torch.tensor(y, dtype=torch.float64)), [(v - mu) / sd for v in y])
    g = torch.Generator().manual_seed(0)
    w = whiten(torch.randn(1000, generator=g) * 5 + 3)
    assert abs(w.mean().item()) < 1e-5 and abs(w.std().item() - 1.0) < 1e-4
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x, torch.tensor([1, 0, 0, 0]))


# ---------------------------------------------------------------------------------- Llama 2 PPO reward


def test_logit() -> None:
    close(logit(torch.tensor([0.5, 0.75, 0.1])), [0.0, math.log(3), math.log(1 / 9)])
    eps = 1e-6
    close(
        logit(torch.tensor([0.0, 1.0], dtype=torch.float64)),
        [math.log(eps / (1 - eps)), math.log((1 - eps) / eps)],
    )


def test_combined_reward_gating_four_cases() -> None:
    helpful = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9])
    safety = torch.tensor([0.5, 0.1, 0.5, 0.1, 0.15])
    is_safety = torch.tensor([False, False, True, True, False])
    # not safety prompt & safe -> Rh; unsafe answer -> Rs; safety prompt -> Rs (both); Rs == 0.15 is not < 0.15.
    close(combined_reward(helpful, safety, is_safety), [0.9, 0.1, 0.5, 0.1, 0.9])
    close(combined_reward(helpful, safety, is_safety, threshold=0.6), [0.5, 0.1, 0.5, 0.1, 0.15])


def test_llama2_ppo_reward() -> None:
    helpful = torch.tensor([0.9, 0.9, 0.9, 0.9])
    safety = torch.tensor([0.5, 0.1, 0.5, 0.1])
    is_safety = torch.tensor([0, 0, 1, 1])
    raw = [math.log(9), math.log(1 / 9), 0.0, math.log(1 / 9)]
    close(llama2_ppo_reward(helpful, safety, is_safety, whiten=False), raw)
    mu, sd = statistics.mean(raw), statistics.stdev(raw)
    close(llama2_ppo_reward(helpful, safety, is_safety), [(v - mu) / sd for v in raw], tol=1e-4)
    # Raw RM scalars: sigmoid first, so passing the logits of the same probabilities gives the same reward.
    as_logits = llama2_ppo_reward(
        torch.log(helpful / (1 - helpful)),
        torch.log(safety / (1 - safety)),
        is_safety,
        whiten=False,
        scores_are_logits=True,
    )
    close(as_logits, raw, tol=1e-4)
    with pytest.raises(ValueError, match="scores_are_logits=True"):
        llama2_ppo_reward(torch.tensor([2.0, 0.5]), safety[:2], is_safety[:2])


# ------------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_crafted() -> None:
    logp = torch.log(torch.tensor([0.2, 0.5], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.4, 0.25], dtype=torch.float64))
    ln2 = math.log(2)
    k1 = kl_estimate(logp, ref, kind="k1")
    close(k1, [-ln2, ln2])
    assert k1[0] < 0  # the per-token "negative KL" of k1
    close(kl_estimate(logp, ref, kind="k2"), [0.5 * ln2**2, 0.5 * ln2**2])
    close(kl_estimate(logp, ref), [-ln2, ln2])  # default k1
    # k3 = r - 1 - log r with r = ref/pi: r = 2 -> 1 - ln2; r = 0.5 -> -0.5 + ln2.
    close(kl_estimate(logp, ref, kind="k3"), [1 - ln2, -0.5 + ln2])
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, kind="k4")


def test_k3_nonnegative_and_estimators_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (kl_estimate(a, b, kind="k3") >= 0).all() and (kl_estimate(a, b, kind="k2") >= 0).all()
    # Monte Carlo: samples from pi, mean of k1 and k3 ~ exact KL(pi || ref).
    pi, ref = [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]
    exact = sum(p * math.log(p / q) for p, q in zip(pi, ref, strict=True))
    idx = torch.multinomial(torch.tensor(pi), 200_000, replacement=True, generator=g)
    logp, ref_logp = torch.log(torch.tensor(pi))[idx], torch.log(torch.tensor(ref))[idx]
    for kind in ("k1", "k3"):
        assert abs(kl_estimate(logp, ref_logp, kind=kind).mean().item() - exact) < 0.01, kind


def test_kl_penalized_rewards() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.5, -3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    beta = 0.1
    out = kl_penalized_rewards(torch.tensor([1.0, -2.0]), logp, ref, mask, beta)
    # row 0: -0.1 * [0.5, -1.0, 0.0], score 1 on token 2; row 1: -0.1 * [-0.5, 2.0], score -2 on token 1.
    close(out, [[-0.05, 0.1, 1.0, 0.0], [0.05, -0.2 - 2.0, 0.0, 0.0]])
    # Masked prompt tokens before the response: the score goes on the last response token.
    out = kl_penalized_rewards(torch.tensor([3.0]), logp[:1], ref[:1], torch.tensor([[0, 1, 1, 0]]), beta)
    close(out, [[0.0, 0.1, 3.0, 0.0]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        kl_penalized_rewards(torch.zeros(2), logp, ref, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), beta)


# ----------------------------------------------------------------------------------------------------- PPO


def gae_by_hand(r: list[float], v: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    adv, last = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        next_v = v[t + 1] if t + 1 < len(r) else 0.0
        last = r[t] + gamma * next_v - v[t] + gamma * lam * last
        adv[t] = last
    return adv, [a + b for a, b in zip(adv, v, strict=True)]


def test_gae_hand_loop_with_padding() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0], [0.5, -1.0, 7.0, 7.0]])  # 7.0 = garbage in padding
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a0, r0 = gae_by_hand([0.0, 0.0, 1.0], [0.1, 0.2, 0.3], 0.9, 0.8)
    close(adv[0], a0 + [0.0])
    close(ret[0], r0 + [0.0])
    # Row 1 written out: t=1: delta = -1 + 0 - 0.5 = -1.5; t=0: delta = 0.5 + 0.9*0.5 - 0.4 = 0.55,
    # A0 = 0.55 + 0.72 * -1.5 = -0.53; returns = A + V.
    close(adv[1], [-0.53, -1.5, 0.0, 0.0])
    close(ret[1], [-0.13, -1.0, 0.0, 0.0])
    # gamma=1, lam=1: advantages are reward-to-go minus value.
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv[0], [1.0 - 0.1, 1.0 - 0.2, 1.0 - 0.3, 0.0])
    with pytest.raises(ValueError, match="contiguous"):
        gae(rewards, values, torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]]))


def test_policy_loss_clip_fraction_and_grad() -> None:
    old = torch.zeros(1, 5)
    ratios = [1.5, 0.5, 0.5, 1.0, 3.0]
    logp = torch.log(torch.tensor([ratios])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clip_frac, approx_kl = policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 0.8 (clipped), -2.0; the masked token is ignored.
    close(loss, (-1.2 - 0.5 + 0.8 - 2.0) / 4)
    close(clip_frac, 0.5)
    close(approx_kl, sum(r - 1 - math.log(r) for r in ratios[:4]) / 4)
    loss.backward()
    # d/dlogp of -A r / 4 = -A r / 4 where unclipped; 0 where clipped or masked.
    close(logp.grad, [[0.0, -0.5 / 4, 0.0, -2.0 / 4, 0.0]])


def test_value_loss() -> None:
    values = torch.tensor([[1.0, 0.0, 5.0]])
    old = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.1, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: unclipped (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 1.69; token 1: 0.01; 0.5 * mean.
    close(value_loss(values, old, returns, mask, clip=0.2), 0.5 * (1.69 + 0.01) / 2)
    close(value_loss(values, old, returns, mask, clip=10.0), 0.5 * (1.0 + 0.01) / 2)


# ---------------------------------------------------------------------------------------------- from logits


def test_logprobs_from_logits() -> None:
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    out = logprobs_from_logits(logits, torch.tensor([[2, -100]]))
    close(out, [[3 - math.log(math.e + math.e**2 + math.e**3), 0.0]])
    out = logprobs_from_logits(logits, torch.tensor([[0, 1]]))
    close(out, [[1 - math.log(math.e + math.e**2 + math.e**3), -math.log(3)]])
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3, 5, 50, generator=g) * 3
    labels = torch.randint(0, 50, (3, 5), generator=g)
    ref = torch.log_softmax(big, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(big, labels), ref)
    bf16 = logprobs_from_logits(big.bfloat16(), labels)
    assert bf16.dtype == torch.float32
    close(bf16, ref, tol=0.1)


def test_entropy_from_logits() -> None:
    p = [0.4, 0.3, 0.2, 0.1]
    h = -sum(q * math.log(q) for q in p)
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(q) + 5.0 for q in p], [9.0, 0.0, 0.0, 0.0]]])
    close(entropy_from_logits(logits, torch.tensor([[1, 1, 0]])), (math.log(4) + h) / 2)


def test_sft_loss() -> None:
    logits = torch.tensor([[[5.0, -5.0], [0.0, math.log(3)], [0.0, 0.0]]])
    labels = torch.tensor([[1, 1, 0]])
    mask = torch.tensor([[0, 1, 1]])
    expected = (math.log(4 / 3) + math.log(2)) / 2  # -log(3/4) and -log(1/2); token 0 is prompt
    close(sft_loss(logits, labels, mask), expected)
    close(F.cross_entropy(logits[0], torch.tensor([-100, 1, 0])), expected)  # independent cross-check
    close(sft_loss(logits, torch.tensor([[-100, 1, 0]]), mask), expected)  # ignore label on a masked token


def test_public_names() -> None:
    for name in losses.__all__:
        assert getattr(losses, name).__doc__ or name.isupper(), name
