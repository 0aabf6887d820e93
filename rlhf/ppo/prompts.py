"""PPO prompt sets: synthetic token prompts, Anthropic HH-RLHF prompts (harmless-base ones safety-flagged) or a
JSONL file; a deterministic held-out split for early stopping; the per-iteration order and its DP shards.

    prompts = prompt_set(cfg.prompts, tokenizer=tok, vocab_size=32000, seed=cfg.train.seed)
    train, heldout = split_heldout(prompts, n=64)
    batch = iteration_prompts(train, iteration=3, n=512, seed=1234)   # global order, same on every rank
    mine = shard(batch, dp_rank=r, dp_size=dp)                         # batch[r::dp]

Sharding rule: rank r takes ``batch[r::dp]`` and splits its share into consecutive minibatch pieces of
``minibatch / dp``; the union of the ranks' k-th pieces is exactly ``batch[k * minibatch:(k + 1) * minibatch]``,
the k-th minibatch of a single process, so every layout takes the same gradient steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.paths import resolve_path
from rlhf.sources import Prompt, hh_files, load_prompts, report_dict, sniff_format
from train.config_reader import ConfigError

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


def _read_prompts(path: Path, *, print_fn: Any, report: dict[str, Any]) -> list[Prompt]:
    """Every prompt of an HH-RLHF directory or one file (``rlhf.sources.load_prompts``), marked with its side of
    the split the reward models trained on (the defaults), so held-out PPO prompts were never seen by them."""
    files = hh_files(path) if path.is_dir() else [(path, False)]
    prompts: list[Prompt] = []
    readers = report.setdefault("readers", [])
    for file, is_safety in files:
        found, report = load_prompts(file, side="all", is_safety=is_safety)
        print_fn(f"prompts: {file}: {report}")
        readers.append({"path": str(file), "prompts": len(found), **report_dict(report)})
        if not path.is_dir() and sniff_format(file) == "dialogues":
            # No reward model trained on a dialogue file: any of its prompts may be held out.
            found = [dataclasses.replace(p, heldout_side=True) for p in found]
        prompts += found
    return prompts


def prompt_set(data: Any, *, tokenizer: Any, vocab_size: int, seed: int, print_fn: Any = print,
               report: dict[str, Any] | None = None) -> list[Prompt]:
    """The configured prompt set (``data`` is ``PPOConfig.prompts``), chat-encoded, deduplicated, too-long ones
    dropped and counted; ``Prompt.index`` numbers them. ``report`` (if given) receives what each file gave and
    skipped, for ``data_report.json``."""
    report = {} if report is None else report
    if data.source == "synthetic":
        return synthetic_prompts(n=data.synthetic_count, vocab_size=vocab_size, min_len=data.synthetic_min_len,
                                 max_len=data.synthetic_max_len, seed=seed,
                                 safety_fraction=data.synthetic_safety_fraction,
                                 bos_id=tokenizer.bos_id if tokenizer is not None else 1)
    if tokenizer is None:
        raise ConfigError(f"prompts.source={data.source!r} needs data.tokenizer (the policy's tokenizer.model)")
    out: list[Prompt] = []
    seen: set[tuple[int, ...]] = set()
    too_long = 0
    duplicates = 0
    for prompt in _read_prompts(resolve_path(data.source), print_fn=print_fn, report=report):
        # The system prompt of a dialogue file is not part of a PPO prompt (the turns are).
        ids = tuple(_encode(tokenizer, list(prompt.turns), data.template))
        if len(ids) > data.max_tokens:
            too_long += 1
            continue
        if ids in seen:
            duplicates += 1
            continue
        seen.add(ids)
        out.append(dataclasses.replace(prompt, index=len(out), ids=ids))
    report.update({"unique_prompts": len(out), "safety_flagged": sum(p.is_safety for p in out),
                   f"longer than prompts.max_tokens={data.max_tokens} (dropped)": too_long,
                   "duplicates of an earlier prompt (dropped)": duplicates})
    print_fn(f"prompts: {len(out)} unique prompts ({sum(p.is_safety for p in out)} safety-flagged); "
             f"{too_long} longer than prompts.max_tokens={data.max_tokens} dropped")
    return out


def _rank_key(prompt: Prompt) -> bytes:
    return hashlib.sha1(b"ppo-heldout-v1\0" + ",".join(map(str, prompt.ids)).encode()).digest()


def split_heldout(prompts: Sequence[Prompt], *, n: int) -> tuple[list[Prompt], list[Prompt]]:
    """``(train, heldout)``: of the prompts on the held-out side, the ``n`` with the smallest hash are held out
    (stable, exact size); every other prompt trains."""
    candidates = [p for p in prompts if p.heldout_side]
    if n >= len(prompts) or n > len(candidates):
        raise ConfigError(f"prompts.heldout={n}: only {len(candidates)} of the {len(prompts)} prompts may be "
                          "held out (the reward models' held-out side); lower it")
    ranked = sorted(candidates, key=_rank_key)
    held = {p.index for p in ranked[:n]}
    return [p for p in prompts if p.index not in held], [p for p in prompts if p.index in held]


def iteration_prompts(prompts: Sequence[Prompt], *, iteration: int, n: int, seed: int) -> list[Prompt]:
    """The ``n`` prompts of one iteration: epochs over a seeded permutation, continued across iterations."""
    if n > len(prompts):
        raise ConfigError(f"ppo.prompts_per_iteration={n} exceeds the {len(prompts)} training prompts")
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
