"""Batched log-likelihood of continuations given contexts: what lm-eval's ``loglikelihood`` asks of a model.

    from evaluation.scoring import LlamaRunner, score_requests
    runner = LlamaRunner(model)                                   # a Llama; TP: its vocab-parallel head is gathered
    results = score_requests(runner, [(ctx_ids, cont_ids), ...], batch_size=32)   # [(logprob, is_greedy), ...]

Semantics are lm-eval's ``HFLM._loglikelihood_tokens`` exactly: the model reads ``(context + continuation)``
left-truncated to ``max_length + 1`` tokens minus the last one, and the result is the summed log-probability of
the continuation tokens and whether greedy decoding reproduces all of them. How it is computed differs:

- Requests are grouped by their (truncated) context. A context with several continuations (the choices of a
  multiple-choice question) is read once: the contexts of a batch are prefilled into a KV cache, the cache rows
  are copied per continuation, and only the continuation tokens run through the model (positions continue after
  each row's own context; the padding between a short context and the batch's longest is masked out). lm-eval's
  HF backend shares work only for one-token continuations (its ``logits_cache``).
- A context with one continuation, or whose continuations are all one token, is one plain forward.
- The output head and the log-softmax run only at the positions that are scored (HF computes
  ``[batch, seq, vocab]`` logits and their log-softmax everywhere), in chunks of ``HEAD_CHUNK`` positions.
- Batches are groups sorted by length (longest first, as lm-eval does), so padding stays small.

Work is split over data-parallel ranks by ``evaluation.parallel.EvalGroups`` (costs = tokens run); tensor-parallel
ranks run identical batches and gather the vocabulary slices of the logits at the scored positions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from lm_eval import utils as lm_utils
from torch import Tensor

from evaluation.parallel import EvalGroups
from model.llama import KVCache, Llama

HEAD_CHUNK = 1024
"""Scored positions per output-head call: bounds the ``[chunk, vocab]`` logits (128K vocab: 0.5 GB in fp32)."""


class LlamaRunner:
    """The forward passes scoring needs, over a ``Llama`` (plain, or tensor-parallel with ``MegatronLayers``)."""

    def __init__(self, model: Llama, *, groups: EvalGroups | None = None, max_length: int | None = None) -> None:
        self.model = model
        self.groups = groups or EvalGroups()
        self.max_length = int(max_length or model.config.max_seq_len)
        self.device = next(model.parameters()).device
        self.config = model.config

    @torch.inference_mode()
    def hidden(self, tokens: Tensor, *, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Final-norm hidden states ``[b, s, dim]``."""
        return self.model(tokens, positions=positions, cache=cache, return_hidden=True)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary logits ``[n, vocab]`` for hidden states ``[n, dim]`` (TP slices gathered)."""
        local = self.model.output(hidden)
        if self.groups.tp_size == 1:
            return local
        from model.parallel import gather_vocab_logits

        return gather_vocab_logits(local, group=self.groups.tp_group, tp_size=self.groups.tp_size)

    def allocate_cache(self, *, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.model, batch=batch, max_len=max_len, prepack_weights=False)


@dataclass
class ContextGroup:
    """One (truncated) context and the requests that continue it: ``(request index, continuation)``."""

    context: tuple[int, ...]
    members: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    @property
    def shares_prefix(self) -> bool:
        """Read the context once for several multi-token continuations (the KV-cache path)."""
        return len(self.members) > 1 and any(len(c) > 1 for _, c in self.members)

    @property
    def flat_input(self) -> tuple[int, ...]:
        """The plain path's input: the context, plus the continuation but its last token when there is one."""
        return self.context + (self.members[0][1][:-1] if len(self.members) == 1 else ())

    @property
    def cost(self) -> int:
        """Tokens run through the model for this group (the DP balance and the batch order)."""
        if self.shares_prefix:
            return len(self.context) + sum(len(c) - 1 for _, c in self.members)
        return len(self.flat_input)

    @property
    def length(self) -> int:
        """Longest row this group contributes (sort key: similar lengths share a batch)."""
        return len(self.context) + max(len(c) for _, c in self.members) - 1


def plan_groups(requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int,
                max_members: int) -> list[ContextGroup]:
    """Truncate as lm-eval does, then group by context (at most ``max_members`` continuations per group)."""
    by_context: dict[tuple[int, ...], list[ContextGroup]] = {}
    groups: list[ContextGroup] = []
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {index}: empty context or continuation ({len(context)}, {len(continuation)} "
                             "tokens); lm-eval gives every request a prefix token and a non-empty continuation")
        if len(continuation) > max_length:
            raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds the model's "
                             f"max_length {max_length}")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        ctx, cont = tuple(whole[: len(whole) - len(continuation)]), tuple(continuation)
        chain = by_context.setdefault(ctx, [])
        if not chain or len(chain[-1].members) >= max_members:
            chain.append(ContextGroup(ctx))
            groups.append(chain[-1])
        chain[-1].members.append((index, cont))
    return groups


def score_requests(runner: LlamaRunner, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   batch_size: int) -> list[tuple[float, bool]]:
    """``(sum of continuation log-probs, all continuation tokens greedy)`` per request, in input order."""
    if not requests:
        return []
    groups = plan_groups(requests, max_length=runner.max_length, max_members=max(1, batch_size))
    eval_groups = runner.groups
    mine = eval_groups.my_share([g.cost for g in groups])
    local: dict[int, tuple[float, bool]] = {}
    for batch in batches_of([groups[i] for i in mine], batch_size=batch_size):
        local.update(score_batch(runner, batch))
    indices = sorted(local)
    return eval_groups.gather_by_index(indices, [local[i] for i in indices], total=len(requests))


def batches_of(groups: Sequence[ContextGroup], *, batch_size: int) -> list[list[ContextGroup]]:
    """Longest first; a batch holds at most ``batch_size`` continuation rows and one kind of path."""
    out: list[list[ContextGroup]] = []
    for shared in (True, False):
        pending = sorted((g for g in groups if g.shares_prefix == shared), key=lambda g: (-g.length, g.context))
        batch: list[ContextGroup] = []
        rows = 0
        for group in pending:
            n = len(group.members) if shared else 1
            if batch and rows + n > batch_size:
                out.append(batch)
                batch, rows = [], 0
            batch.append(group)
            rows += n
        if batch:
            out.append(batch)
    return out


def _right_padded(rows: Sequence[Sequence[int]], *, device: torch.device) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


@torch.inference_mode()
def score_batch(runner: LlamaRunner, batch: Sequence[ContextGroup]) -> dict[int, tuple[float, bool]]:
    """Score every member of the groups in ``batch`` (all on the same path, see ``batches_of``)."""
    if batch[0].shares_prefix:
        hidden, targets, owners = _shared_prefix_hidden(runner, batch)
    else:
        hidden, targets, owners = _flat_hidden(runner, batch)
    logprobs, greedy = target_logprobs(runner, hidden, targets)
    request_ids = [index for group in batch for index, _ in group.members]
    counts = torch.bincount(owners, minlength=len(request_ids)).tolist()
    # One fp32 sum per request over its tokens in order: the reduction lm-eval's hf backend does, so the two
    # agree to the per-token rounding (a float64 sum would be more exact, and differ from hf by up to ~1e-4).
    return {index: (float(lp.sum()), bool(g.all()))
            for index, lp, g in zip(request_ids, logprobs.split(counts), greedy.split(counts), strict=True)}


def _flat_hidden(runner: LlamaRunner, batch: Sequence[ContextGroup]) -> tuple[Tensor, Tensor, Tensor]:
    """One forward per group; each member's continuation is read off the last positions of its input.

    Returns the hidden states at the scored positions, their target tokens, and which member (batch order) each
    belongs to; every member's positions are contiguous and in token order (as ``score_batch`` needs)."""
    inputs = [g.flat_input for g in batch]
    hidden = runner.hidden(_right_padded(inputs, device=runner.device))
    rows, cols, targets, owners = [], [], [], []
    member = 0
    for row, (group, inp) in enumerate(zip(batch, inputs)):
        for _, continuation in group.members:
            start = len(inp) - len(continuation)  # the position that predicts the first continuation token
            rows += [row] * len(continuation)
            cols += range(start, len(inp))
            targets += continuation
            owners += [member] * len(continuation)
            member += 1
    picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
    return picked, torch.tensor(targets), torch.tensor(owners)


def _shared_prefix_hidden(runner: LlamaRunner, batch: Sequence[ContextGroup]) -> tuple[Tensor, Tensor, Tensor]:
    """Prefill each context once into a KV cache, copy its rows per continuation, run the continuations."""
    device = runner.device
    contexts = [g.context for g in batch]
    ctx_len = torch.tensor([len(c) for c in contexts])
    members = [(g, cont) for g, group in enumerate(batch) for _, cont in group.members]
    owner_ctx = torch.tensor([g for g, _ in members])
    longest_ctx = int(ctx_len.max())
    longest_cont = max(len(c) for _, c in members)
    cache = runner.allocate_cache(batch=len(batch), max_len=longest_ctx + longest_cont - 1)
    prefill = runner.hidden(_right_padded(contexts, device=device), cache=cache)
    first = prefill[owner_ctx.to(device), (ctx_len[owner_ctx] - 1).to(device)]  # predicts continuation token 0

    rows = owner_ctx.to(device)
    expanded = KVCache(keys=[k.index_select(0, rows) for k in cache.keys],
                       values=[v.index_select(0, rows) for v in cache.values],
                       key_valid=cache.key_valid.index_select(0, rows).clone(), length=cache.length)
    slots = torch.arange(cache.key_valid.shape[1], device=device)
    # Right padding of the shorter contexts sits between them and their continuation: mask it out.
    own_len = ctx_len[owner_ctx].to(device)
    expanded.key_valid &= ~((slots[None, :] >= own_len[:, None]) & (slots[None, :] < longest_ctx))
    steps = longest_cont - 1
    cont_inputs = _right_padded([list(c[:-1]) or [0] for _, c in members], device=device)[:, :steps]
    positions = own_len[:, None] + torch.arange(steps, device=device)[None, :]
    rest = runner.hidden(cont_inputs, positions=positions, cache=expanded)  # predicts tokens 1..n-1

    # Each member's positions contiguous and in token order (its first token from the prefill, the rest after).
    rest_base = len(members)
    picks, targets, owners = [], [], []
    for member, (_, continuation) in enumerate(members):
        picks += [member] + [rest_base + member * steps + j for j in range(len(continuation) - 1)]
        targets += continuation
        owners += [member] * len(continuation)
    stacked = torch.cat([first, rest.reshape(-1, rest.shape[-1])])
    return stacked[torch.tensor(picks, device=device)], torch.tensor(targets), torch.tensor(owners)


def target_logprobs(runner: LlamaRunner, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``log softmax(logits)[target]`` (fp32) and ``argmax == target`` per position, head in chunks."""
    logprobs, greedy = [], []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = runner.logits(hidden[start : start + HEAD_CHUNK])
        target = targets[start : start + HEAD_CHUNK].to(logits.device)
        # log_softmax then gather, in fp32: lm-eval's hf backend's formula, so the roundings agree too.
        logprobs.append(torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, target[:, None])[:, 0].cpu())
        greedy.append((logits.argmax(dim=-1) == target).cpu())
    return torch.cat(logprobs), torch.cat(greedy)


def rolling_windows(tokens: Sequence[int], *, prefix: int, max_length: int,
                    context_len: int = 1) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (``get_rolling_token_windows`` + ``make_disjoint_window``).

    Every token is predicted exactly once; the first from ``prefix`` (BOS) alone. With lm-eval's ``context_len=1``
    the windows are consecutive chunks of ``max_length`` tokens (the last one with as much context as fits);
    a larger ``context_len`` gives every window ``context_len - 1`` tokens of overlap as context (a sliding
    window with stride ``max_length - context_len + 1``).
    """
    return [lm_utils.make_disjoint_window(w) for w in
            lm_utils.get_rolling_token_windows(token_list=list(tokens), prefix_token=prefix, max_seq_len=max_length,
                                               context_len=context_len)]


def rolling_loglikelihoods(runner: LlamaRunner, documents: Sequence[Sequence[int]], *, prefix: int,
                           batch_size: int, context_len: int = 1) -> list[float]:
    """Each token list's total log-likelihood under ``rolling_windows`` (lm-eval's ``loglikelihood_rolling``)."""
    windows: list[tuple[list[int], list[int]]] = []
    owners: list[int] = []
    for index, tokens in enumerate(documents):
        for window in rolling_windows(tokens, prefix=prefix, max_length=runner.max_length, context_len=context_len):
            windows.append(window)
            owners.append(index)
    totals = [0.0] * len(documents)
    for owner, (logprob, _) in zip(owners, score_requests(runner, windows, batch_size=batch_size), strict=True):
        totals[owner] += logprob
    return totals
