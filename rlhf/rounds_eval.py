"""The rounds driver's held-out win rate: this round's model against the previous one, judged by a reward model.

    from rlhf.rounds_eval import win_rate
    rate = win_rate("runs/r/round_2/final", "runs/r/round_1/final", reward_model="runs/rm", prompts=[...])

One sample per held-out prompt from each model (the reward model's hash split: prompts no stage trained on), both
scored by the reward model; a win counts 1, a tie 1/2. Sampling uses ``rlhf.rejection_sampling``'s generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf.rejection_sampling import load_policy, sample_answers, score_answers
from rlhf.reward.scorer import RewardScorer
from rlhf.sources import load_prompts


def win_rate(new: str, old: str, *, reward_model: str, prompts: Sequence[str], max_prompts: int,
             max_new_tokens: int, seed: int, temperature: float = 1.0) -> float:
    scorer = RewardScorer.from_checkpoint(reward_model)
    split = scorer.meta["split"]  # type: ignore[attr-defined]
    held_out = []
    for path in prompts:
        found, _ = load_prompts(path, side="valid", valid_fraction=split["valid_fraction"], seed=split["seed"],
                                is_safety="harmless" in path or "safety" in path)
        held_out += found[:max_prompts]
    scores = []
    for path in (new, old):
        model, tok, template = load_policy(path, tokenizer=None, template=None)
        torch.manual_seed(seed)
        answers = sample_answers(model, tok, held_out, template=template, k=1, temperature=temperature, top_p=1.0,
                                 max_new_tokens=max_new_tokens, seed=seed, batch_size=32)
        scores.append(score_answers({"helpful": scorer}, held_out, [a[0] for a in answers])["selection"])
    wins = (scores[0] > scores[1]).float() + 0.5 * (scores[0] == scores[1]).float()
    return float(wins.mean())
