"""Synthetic preference data with a learnable property, for checking reward-model training end to end.

    from rlhf.synthetic import write_synthetic_preferences, synthetic_tokenizer
    write_synthetic_preferences("prefs.jsonl", n=2000, seed=0, graded=True)
    tok_path = synthetic_tokenizer("tok/synthetic")          # a small SentencePiece model for this text

Every prompt asks about a thing ("Tell me about the river, number 7."); every answer is 10 words. The property
is the number of times the word "sunny" appears: the rejected answer has ``base`` (0-2) of them, the chosen one
``base + gap``. Because both answers may carry the word, a reward model must *count* it (presence alone does
not separate the pairs), and one that scores "more sunny is better" gives larger score gaps to larger
count differences. Graded pairs (``graded=True``) tie the gap to a Llama 2 rating:

    significantly_better: gap 3, better: 2, slightly_better: 1, negligibly_better: 0 (a coin flip: no signal)

Ungraded pairs have no rating and a gap of 1-3. A working reward model separates every pair with gap >= 1
(accuracy ~100%); the negligible ones stay at chance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("apple", "river", "stone", "cloud", "table", "green", "quiet", "music", "bread", "window", "paper", "light",
         "horse", "garden", "simple", "yellow", "travel", "market", "winter", "friend", "number", "little", "happy")
THINGS = ("river", "garden", "market", "window", "horse", "winter", "music", "bread", "paper", "stone")
PROPERTY = "sunny"
GAPS = {"significantly_better": 3, "better": 2, "slightly_better": 1, "negligibly_better": 0}
RATING_WEIGHTS = {"significantly_better": 0.3, "better": 0.3, "slightly_better": 0.25, "negligibly_better": 0.15}


ANSWER_WORDS = 10


def _answer(rng: random.Random, property_count: int) -> str:
    words = [rng.choice(WORDS) for _ in range(ANSWER_WORDS - property_count)]
    for _ in range(property_count):
        words.insert(rng.randint(0, len(words)), PROPERTY)
    return " ".join(words) + "."


def synthetic_pairs(*, n: int, seed: int, graded: bool) -> list[dict]:
    """``n`` preference records ``{"prompt", "chosen", "rejected", "rating"?, "gap", "base"}`` (module docstring)."""
    rng = random.Random(seed)
    ratings, weights = list(RATING_WEIGHTS), list(RATING_WEIGHTS.values())
    out = []
    for i in range(n):
        prompt = f"Tell me about the {rng.choice(THINGS)}, number {i}."
        rating = rng.choices(ratings, weights)[0] if graded else None
        gap = GAPS[rating] if rating else rng.randint(1, 3)
        base = rng.randint(0, 2)
        chosen, rejected = _answer(rng, base + gap), _answer(rng, base)
        while chosen == rejected:
            rejected = _answer(rng, base)
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "gap": gap, "base": base}
        if rating:
            record["rating"] = rating
        out.append(record)
    return out


def write_synthetic_preferences(path: str | Path, *, n: int, seed: int, graded: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for record in synthetic_pairs(n=n, seed=seed, graded=graded):
            fh.write(json.dumps(record) + "\n")
    return path


def synthetic_tokenizer(output_prefix: str | Path, *, vocab_size: int = 360) -> Path:
    """A SentencePiece model (Llama settings) trained on this module's text and the Llama 2 chat tags."""
    from model.tokenizer import train_sentencepiece

    lines = [f"[INST] {r['prompt']} [/INST] {r['chosen']} {r['rejected']}"
             for r in synthetic_pairs(n=400, seed=12345, graded=True)]
    return train_sentencepiece(texts=lines, output_prefix=output_prefix, vocab_size=vocab_size,
                               character_coverage=1.0, num_threads=1)
