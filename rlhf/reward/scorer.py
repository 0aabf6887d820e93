"""Scoring answers with an exported reward model: ``RewardScorer`` batches (prompt turns, answer) by length.

    scorer = RewardScorer.from_checkpoint("runs/rm_helpful")        # tokenizer and template from reward_model.json
    scores = scorer.score([[{"role": "user", "content": "Hi"}]], ["Hello!"])   # [N] fp32, input order
    chosen, rejected = scorer.score_pairs(pairs)

Used by ``rlhf.reward.evaluate`` (accuracy tables) and ``rlhf.rejection_sampling`` (best-of-K); PPO scores its
rollouts with a frozen engine instead (``rlhf.ppo.rewards.RewardModelScorer``: TP x ZeRO).
One process, no process group, so the whole model is this process's shard: ``load_reward_model`` holds it once,
read one tensor at a time (``rlhf.scalar_head.load_scalar_model`` says why that is the bound; a reward model too
large for one host is scored sharded by PPO's frozen engine).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.batching import encode_answer, pad_sequences
from rlhf.data import PreferencePair
from rlhf.reward.model import RewardModel, load_reward_model


class RewardScorer:
    """Scores (prompt turns, answer) with a reward model; batches sorted by length, results in input order."""

    def __init__(self, model: RewardModel, tokenizer: Any, *, template: str, max_len: int, batch_size: int = 16,
                 name: str = "rm") -> None:
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.max_len, self.batch_size, self.name = max_len, batch_size, name
        self.stats: Counter[str] = Counter()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, batch_size: int = 16, tokenizer: str | None = None) -> RewardScorer:
        from model.tokenizer import load_tokenizer

        model, meta = load_reward_model(path)
        tok = load_tokenizer(tokenizer or meta["tokenizer"])
        scorer = cls(model, tok, template=meta["template"], max_len=int(meta["max_len"]), batch_size=batch_size,
                     name=Path(path).name if Path(path).name != "final_model" else Path(path).parent.name)
        scorer.meta = meta  # type: ignore[attr-defined]
        return scorer

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[dict[str, str]]], answers: Sequence[str],
              systems: Sequence[str | None] | None = None) -> Tensor:
        encoded = [encode_answer(self.tokenizer, p, a, template=self.template, max_len=self.max_len,
                                 system=systems[i] if systems else None, stats=self.stats)
                   for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        out = torch.empty(len(encoded))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids = pad_sequences([encoded[i][0] for i in idx])
            where = torch.tensor([encoded[i][1] for i in idx])
            out[idx] = self.model.scores(ids, where)
        return out

    def score_pairs(self, pairs: Sequence[PreferencePair]) -> tuple[Tensor, Tensor]:
        prompts = [p.prompt for p in pairs]
        scores = self.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        return scores[: len(pairs)], scores[len(pairs):]


def sigmoid_scores(scores: Tensor) -> Tensor:
    """RM scores as probabilities (Llama 2 gates its combined reward on ``sigmoid``-space scores)."""
    return F.sigmoid(scores)
