"""PPO prompt sets: synthetic token prompts, Anthropic HH-RLHF prompts (harmless-base ones safety-flagged) or a
JSONL file; a deterministic held-out split for early stopping; the per-iteration order and its DP shards.

    prompts, report = load_prompts(cfg.data, tokenizer=tok, seed=cfg.run.seed)
    train, heldout = split_heldout(prompts, n=64)
    batch = iteration_prompts(train, iteration=3, n=512, seed=1234)   # global order, same on every rank
    mine = shard(batch, dp_rank=r, dp_size=dp)                         # batch[r::dp]

Sharding rule: rank r takes ``batch[r::dp]`` and splits its share into consecutive minibatch pieces of
``minibatch / dp``; the union of the ranks' k-th pieces is exactly ``batch[k * minibatch:(k + 1) * minibatch]``,
the k-th minibatch of a single process, so every layout takes the same gradient steps.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.rollout import Prompt

SAFETY_MARKER = 3
"""Token id that opens every synthetic safety prompt (after BOS) and no other: the prompt's safety flag is
visible in its text, as it is in real safety prompts, so the value model can learn the two reward scales."""


def synthetic_prompts(*, n: int, vocab_size: int, min_len: int, max_len: int, seed: int, bos_id: int = 1,
                      safety_fraction: float = 0.0) -> list[Prompt]:
    """``n`` prompts of BOS + random ids in ``[SAFETY_MARKER + 1, vocab_size)``; a ``safety_fraction`` share are
    safety prompts, whose second token is ``SAFETY_MARKER``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        is_safety = rng.random() < safety_fraction
        body = [rng.randrange(SAFETY_MARKER + 1, vocab_size) for _ in range(length - 1)]
        if is_safety:
            body[0] = SAFETY_MARKER
        out.append(Prompt(index=i, ids=(bos_id, *body), is_safety=is_safety))
    return out


def _encode(tokenizer: Any, messages: list[dict[str, str]], template: str) -> list[int]:
    from model.chat import encode_chat

    return encode_chat(tokenizer, messages, template=template, add_generation_prompt=True).ids


def _hh_files(root: Path) -> list[tuple[Path, bool]]:
    files = []
    for sub, is_safety in (("helpful-base", False), ("harmless-base", True)):
        files += [(p, is_safety) for p in sorted((root / sub).glob("*.jsonl*"))]
    if not files:
        raise ValueError(f"{root}: no helpful-base/*.jsonl[.gz] or harmless-base/*.jsonl[.gz] files (HH-RLHF)")
    return files


def _prompt_records(path: Path, *, print_fn: Any) -> list[tuple[list[dict[str, str]], bool, bool]]:
    """``(prompt turns, is_safety, on the held-out side)`` of every record. Preference pairs are split with
    ``rlhf.data.split_by_hash`` and its defaults, the split the reward models trained on (``rlhf/sources.py``),
    so held-out PPO prompts were never seen by the reward models."""
    from rlhf.data import read_dialogues_jsonl, read_hh_rlhf, read_preferences_jsonl, split_by_hash

    pairs = []
    if path.is_dir():
        for file, is_safety in _hh_files(path):
            found, report = read_hh_rlhf(file, is_safety=is_safety)
            print_fn(f"prompts: {file}: {report}")
            pairs += found
    else:
        pairs, report = read_preferences_jsonl(path)
        if report.kept == 0:  # not preference pairs: dialogues (prompt = all but a final assistant turn)
            dialogues, report = read_dialogues_jsonl(path, require_final_assistant=False)
            print_fn(f"prompts: {path}: {report}")
            return [(d.messages[:-1] if d.messages[-1]["role"] == "assistant" else d.messages, False, True)
                    for d in dialogues]
        print_fn(f"prompts: {path}: {report}")
    _, valid = split_by_hash(pairs)
    held = {id(p) for p in valid}
    return [(p.prompt, p.is_safety, id(p) in held) for p in pairs]


def load_prompts(data: Any, *, tokenizer: Any, vocab_size: int, seed: int,
                 print_fn: Any = print) -> list[Prompt]:
    """The configured prompt set (``data`` is ``PPOConfig.data``), deduplicated, too-long ones dropped and counted."""
    if data.prompts == "synthetic":
        return synthetic_prompts(n=data.synthetic_prompts, vocab_size=vocab_size, min_len=data.synthetic_min_len,
                                 max_len=data.synthetic_max_len, seed=seed,
                                 safety_fraction=data.synthetic_safety_fraction,
                                 bos_id=tokenizer.bos_id if tokenizer is not None else 1)
    if tokenizer is None:
        raise ValueError(f"data.prompts={data.prompts!r} needs data.tokenizer (the policy's tokenizer.model)")
    out: list[Prompt] = []
    seen: set[tuple[int, ...]] = set()
    too_long = 0
    from rlhf.config import resolve_path

    for messages, is_safety, heldout_side in _prompt_records(resolve_path(data.prompts), print_fn=print_fn):
        ids = tuple(_encode(tokenizer, messages, data.template))
        if len(ids) > data.max_prompt_tokens:
            too_long += 1
            continue
        if ids in seen:
            continue
        seen.add(ids)
        out.append(Prompt(index=len(out), ids=ids, is_safety=is_safety, text=messages[-1]["content"],
                          heldout_side=heldout_side))
    print_fn(f"prompts: {len(out)} unique prompts ({sum(p.is_safety for p in out)} safety-flagged); "
             f"{too_long} longer than data.max_prompt_tokens={data.max_prompt_tokens} dropped")
    return out


def _rank_key(prompt: Prompt) -> bytes:
    return hashlib.sha1(b"ppo-heldout-v1\0" + ",".join(map(str, prompt.ids)).encode()).digest()


def split_heldout(prompts: Sequence[Prompt], *, n: int) -> tuple[list[Prompt], list[Prompt]]:
    """``(train, heldout)``: of the prompts on the held-out side, the ``n`` with the smallest hash are held out
    (stable, exact size); every other prompt trains."""
    candidates = [p for p in prompts if p.heldout_side]
    if n >= len(prompts) or n > len(candidates):
        raise ValueError(f"data.heldout_prompts={n}: only {len(candidates)} of the {len(prompts)} prompts may be "
                         "held out (the reward models' held-out side); lower it")
    ranked = sorted(candidates, key=_rank_key)
    held = {p.index for p in ranked[:n]}
    return [p for p in prompts if p.index not in held], [p for p in prompts if p.index in held]


def iteration_prompts(prompts: Sequence[Prompt], *, iteration: int, n: int, seed: int) -> list[Prompt]:
    """The ``n`` prompts of one iteration: epochs over a seeded permutation, continued across iterations."""
    if n > len(prompts):
        raise ValueError(f"ppo.prompts_per_iteration={n} exceeds the {len(prompts)} training prompts")
    start = iteration * n
    out: list[Prompt] = []
    epoch = start // len(prompts)
    offset = start % len(prompts)
    while len(out) < n:
        order = list(prompts)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out += order[offset : offset + n - len(out)]
        epoch, offset = epoch + 1, 0
    return out


def shard(items: Sequence[Any], *, dp_rank: int, dp_size: int) -> list[Any]:
    """This data-parallel rank's share: ``items[dp_rank::dp_size]`` (see the module docstring)."""
    if len(items) % dp_size:
        raise ValueError(f"{len(items)} items do not split evenly over {dp_size} data-parallel ranks")
    return list(items[dp_rank::dp_size])
