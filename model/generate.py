"""Batched KV-cache generation: greedy, temperature and top-p sampling, stop tokens, deterministic seeds.

    from model.generate import generate
    completions = generate(model, [[1, 450, 4996], [1, 910]], max_new_tokens=64, temperature=0.8,
                           top_p=0.95, stop_ids=tokenizer.stop_ids, seed=0)

Prompts of different lengths are left-padded so every row writes the same cache slot at each step; padded
slots are masked out of attention and each row's RoPE positions start at 0 at its first real token, so a
row's output does not depend on what it is batched with (up to float rounding).
The whole prompt is one prefill forward; each new token is one forward of length 1 over the cache.

``stop_fn`` ends rows on a condition other than a stop token (lm-eval's stop *strings*): called after every step
with that step's tokens ``[b]``, it returns a bool ``[b]`` of rows that end with this token (kept in their output).

``row_seeds`` gives every row its own sampling generator, so a row's tokens depend only on its prompt and its
seed, not on the batch it is in or on the process that generates it (PPO rollouts split over data-parallel
ranks reproduce a single-process run). ``logits_fn`` maps final hidden states to full-vocabulary logits
(default ``model.output``; under tensor parallelism it gathers the vocab-parallel slices, see
``rlhf/ppo/rollout.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from model.llama import KVCache, Llama


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Pick one token per row of ``logits [b, vocab]``: argmax at temperature 0, else nucleus sampling.

    ``generator`` may be one generator for the batch or a sequence of one generator per row.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([sample_next_token(logits[i : i + 1], temperature=temperature, top_p=top_p, generator=g)
                          for i, g in enumerate(generator)])
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    pad_id: int = 0,
    row_seeds: Sequence[int] | None = None,
    logits_fn: Callable[[Tensor], Tensor] | None = None,
    stop_fn: Callable[[Tensor], Tensor] | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt, ending before the first stop token.

    ``row_seeds`` (one int per prompt, instead of ``seed``): per-row generators, see the module docstring.
    ``logits_fn``: final hidden states ``[b, dim]`` -> full-vocabulary logits (default ``model.output``).
    ``stop_fn``: this step's tokens ``[b]`` -> bool ``[b]``, rows that end after this token (see module docstring).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. the BOS id)")
    device = next(model.parameters()).device
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"generate: prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"the model context max_seq_len={model.config.max_seq_len}; shorten the prompt or "
                         "max_new_tokens")
    generator = _generators(seed=seed, row_seeds=row_seeds, rows=len(prompts), device=device)
    cache = KVCache.allocate(model, batch=batch, max_len=total)
    tokens, positions = _left_padded(prompts, cache=cache, pad_id=pad_id, device=device)
    # On CPU the cache may carry the weights prepacked for decode GEMMs (model/prepack.py), the head's too.
    head = logits_fn if logits_fn is not None else (cache.packed.output_logits if cache.packed else model.output)

    hidden = model(tokens, positions=positions, cache=cache, return_hidden=True)
    logits = head(hidden[:, -1])
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ended_by_fn = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)  # output length cap
    next_positions = positions[:, -1:] + 1
    outputs: list[Tensor] = []
    for _ in range(max_new_tokens):
        next_token = sample_next_token(logits, temperature=temperature, top_p=top_p, generator=generator)
        next_token = next_token.masked_fill(finished, pad_id)
        outputs.append(next_token)
        finished |= torch.isin(next_token, stop)
        if stop_fn is not None:
            ends = stop_fn(next_token).to(device) & ~finished
            ended_by_fn = torch.where(ends, len(outputs), ended_by_fn)
            finished |= ends
        if bool(finished.all()) or len(outputs) == max_new_tokens:
            break
        hidden = model(next_token[:, None], positions=next_positions, cache=cache, return_hidden=True)
        logits = head(hidden[:, -1])
        next_positions = next_positions + 1

    generated = torch.stack(outputs, dim=1).tolist() if outputs else [[] for _ in prompts]
    return _trimmed(generated, caps=ended_by_fn.tolist(), stop_ids=set(stop_ids))


def _left_padded(prompts: Sequence[Sequence[int]], *, cache: KVCache, pad_id: int,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """Prompts left-padded to one length ``[b, s]``, their RoPE positions (0 at each prompt's first token), and
    the padding slots marked invalid in ``cache.key_valid``."""
    prompt_len = max(len(p) for p in prompts)
    pad_lengths = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
    tokens = torch.full((len(prompts), prompt_len), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
    slots = torch.arange(prompt_len, device=device)
    cache.key_valid[:, :prompt_len] = slots[None, :] >= pad_lengths[:, None]
    return tokens, (slots[None, :] - pad_lengths[:, None]).clamp(min=0)


def _generators(*, seed: int | None, row_seeds: Sequence[int] | None, rows: int,
                device: torch.device) -> torch.Generator | list[torch.Generator] | None:
    """One generator for the batch (``seed``), one per row (``row_seeds``), or None (torch's global one)."""
    if row_seeds is not None:
        if len(row_seeds) != rows or seed is not None:
            raise ValueError(f"generate: row_seeds needs one seed per prompt ({len(row_seeds)} for {rows} "
                             "prompts) and no seed=")
        return [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]
    if seed is not None:
        return torch.Generator(device=device).manual_seed(seed)
    return None


def _trimmed(generated: list[list[int]], *, caps: list[int], stop_ids: set[int]) -> list[list[int]]:
    """Each row up to (not including) its first stop token, and at most its ``stop_fn`` length cap."""
    results = []
    for row, cap in zip(generated, caps):
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[: min(cut, cap)])
    return results
