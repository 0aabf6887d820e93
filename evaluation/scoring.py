"""Batched log-likelihood of continuations given contexts: what lm-eval's ``loglikelihood`` asks of a model.

    from evaluation.scoring import LlamaRunner, score_requests
    runner = LlamaRunner(model)                                   # a Llama; TP: its vocab-parallel head is gathered
    results = score_requests(runner, [(ctx_ids, cont_ids), ...], batch_size=32)   # [(logprob, is_greedy), ...]

Semantics are lm-eval's ``HFLM._loglikelihood_tokens`` exactly: the model reads ``(context + continuation)``
left-truncated to ``max_length + 1`` tokens minus the last one, and the result is the summed log-probability of
the continuation tokens and whether greedy decoding reproduces all of them. How it is computed differs:

- Requests that start with the same tokens share them (``plan_groups``: inputs sorted, neighbours grouped while
  they share at least half of the shortest context): the shared prefix is read once, prefilled into a KV cache
  whose rows are copied per request, and only each request's own remainder runs through the model (positions
  continue after the prefix; the padding between a short prefix and the batch's longest is masked out). So the
  choices of a multiple-choice question read their context once, and WinoGrande's two contexts ("... Sarah" /
  "... Emily" + the same ending) their common start. lm-eval's HF backend shares work only between one-token
  continuations of the same context (its ``logits_cache``).
- A request that shares nothing, or whose group needs nothing past the prefix (one-token continuations of one
  context), is a plain forward without a cache.
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
from model import kernels
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


MIN_SHARED_TOKENS = 4
"""Requests share a prefix only if it is at least this long and half of the shortest member's context."""


@dataclass(frozen=True)
class Request:
    """One request after lm-eval's truncation: the model's ``input`` and which of its positions are scored."""

    index: int
    input: tuple[int, ...]
    """``(context + continuation)[-(max_length + 1):][:-1]``."""
    continuation: tuple[int, ...]

    @property
    def start(self) -> int:
        """The input position whose output predicts the first continuation token."""
        return len(self.input) - len(self.continuation)


@dataclass
class PrefixGroup:
    """Requests whose inputs begin with the same ``prefix_len`` tokens (read once for all of them)."""

    prefix_len: int
    members: list[Request] = field(default_factory=list)

    @property
    def prefix(self) -> tuple[int, ...]:
        return self.members[0].input[: self.prefix_len]

    def rest(self, member: Request) -> tuple[int, ...]:
        """What this member runs after the shared prefix."""
        return member.input[self.prefix_len :]

    @property
    def needs_rest(self) -> bool:
        """Whether any member has tokens past the prefix (the KV-cache path); else one plain forward."""
        return any(len(m.input) > self.prefix_len for m in self.members)

    @property
    def cost(self) -> int:
        """Tokens run through the model for this group (the DP balance)."""
        return self.prefix_len + sum(len(m.input) - self.prefix_len for m in self.members)

    @property
    def length(self) -> int:
        """Longest input of the group (sort key: similar lengths share a batch)."""
        return max(len(m.input) for m in self.members)


def truncate(requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int) -> list[Request]:
    """lm-eval's truncation, with clear errors for what lm-eval would assert on."""
    out = []
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {index}: empty context or continuation ({len(context)}, {len(continuation)} "
                             "tokens); lm-eval gives every request a prefix token and a non-empty continuation")
        if len(continuation) > max_length:
            raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds the model's "
                             f"max_length {max_length}")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        out.append(Request(index, tuple(whole[:-1]), tuple(continuation)))
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def plan_groups(requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int,
                max_members: int) -> list[PrefixGroup]:
    """Truncate, sort the inputs, and group neighbours that share a long enough prefix (see module docstring).

    A group holds at most ``max_members`` requests; a request alone is a group whose prefix is its whole input.
    """
    items = truncate(requests, max_length=max_length)
    groups: list[PrefixGroup] = []
    for item in sorted(items, key=lambda r: r.input):
        group = groups[-1] if groups else None
        if group is not None and len(group.members) < max_members:
            shared = min(group.prefix_len, _common_prefix(group.prefix, item.input))
            shortest = min(min(m.start for m in group.members), item.start)
            if shared >= max(MIN_SHARED_TOKENS, (shortest + 1) // 2):
                group.prefix_len = shared
                group.members.append(item)
                continue
        groups.append(PrefixGroup(prefix_len=len(item.input), members=[item]))
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
    with kernels.reused_concatenations():  # many small no-grad forwards: concatenate the fused weights once
        for batch in batches_of([groups[i] for i in mine], batch_size=batch_size):
            local.update(score_batch(runner, batch))
    indices = sorted(local)
    return eval_groups.gather_by_index(indices, [local[i] for i in indices], total=len(requests))


def batches_of(groups: Sequence[PrefixGroup], *, batch_size: int) -> list[list[PrefixGroup]]:
    """Longest first; a batch holds at most ``batch_size`` requests, and groups of one kind (plain or cached)."""
    out: list[list[PrefixGroup]] = []
    for cached in (True, False):
        # Cached batches pad their prefixes to the longest prefix (the remainders are chunked by length later);
        # plain batches pad whole inputs.
        key = (lambda g: (-g.prefix_len, g.prefix)) if cached else (lambda g: (-g.length, g.prefix))
        pending = sorted((g for g in groups if g.needs_rest == cached), key=key)
        batch: list[PrefixGroup] = []
        rows = 0
        for group in pending:
            if batch and rows + len(group.members) > batch_size:
                out.append(batch)
                batch, rows = [], 0
            batch.append(group)
            rows += len(group.members)
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
def score_batch(runner: LlamaRunner, batch: Sequence[PrefixGroup]) -> dict[int, tuple[float, bool]]:
    """Score every member of the groups in ``batch`` (all plain or all cached, see ``batches_of``)."""
    hidden, targets, counts = _scored_hidden(runner, batch)
    logprobs, greedy = target_logprobs(runner, hidden, targets)
    members = [m for group in batch for m in group.members]
    # One fp32 sum per request over its tokens in order: the reduction lm-eval's hf backend does, so the two
    # agree to the per-token rounding (a float64 sum would be more exact, and differ from hf by up to ~1e-4).
    return {m.index: (float(lp.sum()), bool(g.all()))
            for m, lp, g in zip(members, logprobs.split(counts), greedy.split(counts), strict=True)}


def _scored_hidden(runner: LlamaRunner, batch: Sequence[PrefixGroup]) -> tuple[Tensor, Tensor, list[int]]:
    """Hidden states at every scored position of every member (members in batch order, each member's positions
    contiguous and in token order), their target tokens, and how many positions each member has.

    The prefixes run as one right-padded forward (with a KV cache when some member continues past its prefix);
    the remainders run as a second forward over the cache rows copied per member.
    """
    device = runner.device
    prefixes = [g.prefix for g in batch]
    widest = max(len(p) for p in prefixes)
    members = [(g, m) for g, group in enumerate(batch) for m in group.members]
    cache = None
    if batch[0].needs_rest:
        longest_rest = max(len(batch[g].rest(m)) for g, m in members)
        cache = runner.allocate_cache(batch=len(batch), max_len=widest + longest_rest)
    prefill = runner.hidden(_right_padded(prefixes, device=device), cache=cache)
    pieces = [prefill.reshape(-1, prefill.shape[-1])]
    rest_start = [0] * len(members)  # where each member's remainder starts in the stacked hidden states
    if cache is not None:
        rest, offsets = _rest_hidden(runner, batch, members, cache, widest=widest)
        pieces.append(rest)
        rest_start = [pieces[0].shape[0] + o for o in offsets]
    picks, targets, counts = [], [], []
    for row, (g, member) in enumerate(members):
        p = batch[g].prefix_len
        for t in range(member.start, len(member.input)):
            picks.append(g * widest + t if t < p else rest_start[row] + (t - p))
        targets += member.continuation
        counts.append(len(member.continuation))
    stacked = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return stacked[torch.tensor(picks, device=device)], torch.tensor(targets), counts


REST_CHUNK_FILL = 0.75
"""Remainders run in chunks of similar length: a chunk ends where a row is shorter than this share of its widest."""


def _rest_hidden(runner: LlamaRunner, batch: Sequence[PrefixGroup], members: list[tuple[int, Request]],
                 cache: KVCache, *, widest: int) -> tuple[Tensor, list[int]]:
    """Each member's tokens after its group's prefix, over copies of the prefix's cache rows.

    Members run longest remainder first, in chunks of similar length (so padding stays small). Returns the
    hidden states of all chunks as ``[positions, dim]`` and, per member, where its remainder starts in them.
    """
    order = sorted(range(len(members)), key=lambda r: -len(batch[members[r][0]].rest(members[r][1])))
    chunks: list[list[int]] = []
    for row in order:
        width = len(batch[members[row][0]].rest(members[row][1]))
        if not chunks or width < REST_CHUNK_FILL * _rest_width(batch, members, chunks[-1][0]):
            chunks.append([])
        chunks[-1].append(row)
    pieces, offsets, base = [], [0] * len(members), 0
    for chunk in chunks:
        hidden = _rest_chunk(runner, batch, [members[r] for r in chunk], cache, widest=widest)
        for i, row in enumerate(chunk):
            offsets[row] = base + i * hidden.shape[1]
        base += hidden.shape[0] * hidden.shape[1]
        pieces.append(hidden.reshape(-1, hidden.shape[-1]))
    return torch.cat(pieces), offsets


def _rest_width(batch: Sequence[PrefixGroup], members: list[tuple[int, Request]], row: int) -> int:
    return max(1, len(batch[members[row][0]].rest(members[row][1])))


def _rest_chunk(runner: LlamaRunner, batch: Sequence[PrefixGroup], members: list[tuple[int, Request]],
                cache: KVCache, *, widest: int) -> Tensor:
    """One chunk of remainders over its rows of the prefill cache: hidden states ``[rows, width, dim]``."""
    device = runner.device
    owner = torch.tensor([g for g, _ in members], device=device)
    prefix_len = torch.tensor([batch[g].prefix_len for g, _ in members], device=device)
    rests = [batch[g].rest(m) or (0,) for g, m in members]  # a member ending at its prefix: one ignored slot
    tokens = _right_padded(rests, device=device)
    end = widest + tokens.shape[1]  # this chunk's cache rows need no more slots than that
    expanded = KVCache(keys=[k[:, :, :end].index_select(0, owner) for k in cache.keys],
                       values=[v[:, :, :end].index_select(0, owner) for v in cache.values],
                       key_valid=cache.key_valid[:, :end].index_select(0, owner).clone(), length=cache.length)
    slots = torch.arange(end, device=device)
    # The right padding of the shorter prefixes sits between them and their remainder: mask it out.
    expanded.key_valid &= ~((slots[None, :] >= prefix_len[:, None]) & (slots[None, :] < widest))
    positions = prefix_len[:, None] + torch.arange(tokens.shape[1], device=device)[None, :]
    return runner.hidden(tokens, positions=positions, cache=expanded)


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
