"""PPO health: KL and reward trend alarms, non-finite iterations, early stopping on held-out prompts.

    guards = PPOGuards(cfg.guards)
    alarms = guards.observe(iteration, kl=..., k1_mean=..., reward=...)   # list of messages, [] when healthy
    guards.nonfinite(iteration, what="rewards")   # counts; raises NonFinitePPO after K in a row
    stopper = EarlyStopping(patience=5, min_delta=0.0); stopper.update(heldout_reward) -> improved?

The failure modes users of peer systems report, and what is watched:
- KL blow-up (the policy leaves the reference; reward hacking): the mean per-sequence KL above ``kl_max``, or
  rising at every one of ``kl_rising_window`` iterations in a row.
- "Negative KL": the k1 estimate ``log pi - log pi_ref`` is negative on single tokens by construction (see
  ``rlhf.losses.kl_estimate``), but its mean over the batch estimates KL >= 0. A batch mean below -0.01 nats for
  ``negative_kl_window`` iterations means the samples are not from pi (log-probs at another temperature, a
  different mask or a stale policy); we log the always-positive k3 estimate next to it for monitoring and keep
  k1 as the penalty (its sum over a sequence is the exact sequence log-ratio, InstructGPT / Llama 2).
- Reward collapse: the HELD-OUT LOGIT(Rc) (``observe_heldout``, every ``eval.every`` iterations) stays more than
  ``reward_drop`` below its best for ``reward_drop_window`` evaluations. The batch reward is not used: it is
  whitened per batch and noisy, and alarmed in the very iteration where held-out reward was at its best.
- NaN/Inf in rewards, log-probs or losses: the iteration's update is skipped (every rank agrees), counted, and
  the run aborts after ``max_consecutive_nonfinite`` in a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class NonFinitePPO(RuntimeError):
    """Too many consecutive iterations with non-finite values."""


@dataclass
class PPOGuards:
    cfg: Any
    kl_history: list[float] = field(default_factory=list)
    negative_streak: int = 0
    best_reward: float = -math.inf
    below_best_streak: int = 0
    consecutive_nonfinite: int = 0
    nonfinite_total: int = 0
    alarms_total: int = 0

    def observe(self, iteration: int, *, kl: float, k1_mean: float, reward: float) -> list[str]:
        """Record one healthy iteration; returns the alarms it raised (also counted in ``alarms_total``)."""
        c, alarms = self.cfg, []
        self.consecutive_nonfinite = 0
        if kl > c.kl_max:
            alarms.append(f"iteration {iteration}: KL to the reference {kl:.3f} nats/sequence > guards.kl_max="
                          f"{c.kl_max}; lower optim.lr or raise reward.beta")
        self.kl_history.append(kl)
        recent = self.kl_history[-(c.kl_rising_window + 1):]
        if len(recent) == c.kl_rising_window + 1 and all(b > a for a, b in zip(recent, recent[1:])):
            alarms.append(f"iteration {iteration}: KL rose {c.kl_rising_window} iterations in a row "
                          f"({recent[0]:.3f} -> {recent[-1]:.3f} nats/sequence)")
        self.negative_streak = self.negative_streak + 1 if k1_mean < -0.01 else 0
        if self.negative_streak >= c.negative_kl_window:
            alarms.append(f"iteration {iteration}: mean k1 KL {k1_mean:.4f} < 0 for {self.negative_streak} "
                          "iterations: the rollouts are not samples of the policy (temperature, masks or a "
                          "stale policy); see rlhf/ppo/guards.py")
        self.alarms_total += len(alarms)
        return alarms

    def observe_heldout(self, iteration: int, heldout_reward: float) -> list[str]:
        """Record one held-out evaluation (LOGIT(Rc) on the held-out prompts); returns the collapse alarm, if any."""
        c, alarms = self.cfg, []
        self.best_reward = max(self.best_reward, heldout_reward)
        below = heldout_reward < self.best_reward - c.reward_drop
        self.below_best_streak = self.below_best_streak + 1 if below else 0
        if self.below_best_streak >= c.reward_drop_window:
            alarms.append(f"iteration {iteration}: held-out LOGIT(Rc) {heldout_reward:.3f} has stayed more than "
                          f"guards.reward_drop={c.reward_drop} below its best {self.best_reward:.3f} for "
                          f"{self.below_best_streak} evaluations (reward collapse)")
        self.alarms_total += len(alarms)
        return alarms

    def nonfinite(self, iteration: int, *, what: str) -> str:
        """Count a skipped iteration; raises ``NonFinitePPO`` after ``max_consecutive_nonfinite`` in a row."""
        self.consecutive_nonfinite += 1
        self.nonfinite_total += 1
        message = f"iteration {iteration}: non-finite {what}; the update is skipped"
        if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
            raise NonFinitePPO(f"{message}: {self.consecutive_nonfinite} iterations in a row, aborting; lower "
                               "optim.lr, check the reward models' outputs, try parallel.dtype=fp32")
        return message


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations without a gain of more than ``min_delta`` (0 = never stop)."""

    patience: int
    min_delta: float = 0.0
    best: float = -math.inf
    best_iteration: int = -1
    since_best: int = 0

    def update(self, value: float, *, iteration: int) -> bool:
        """Record one held-out score; True when it is a new best."""
        if value > self.best + self.min_delta or self.best_iteration < 0:
            self.best, self.best_iteration, self.since_best = value, iteration, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience
