"""PPO rewards: the scorer interface, programmatic scorers, the reward-model scorer, and Llama 2's combined reward
over the data-parallel batch.

    stage = RewardStage(helpful=TargetTokenScorer([5, 17]), safety=None, kind="llama2", group=dp_group)
    result = stage(samples)            # RewardResult: score [n] (WHITEN(LOGIT(Rc))), helpful/safety/combined [n]

A scorer is any callable ``scorer(prompts, answers) -> Tensor [n]`` over token ids (``Sequence[Sequence[int]]``
each), with an attribute ``outputs`` = "probability" (in [0, 1], what Llama 2's gate reads) or "logit" (a raw
reward-model scalar, passed through ``sigmoid`` first). Programmatic scorers let PPO be tested without a
reward model; ``RewardModelScorer`` wraps a frozen scalar-head engine (the helpfulness / safety RMs).

The combined reward (Llama 2 sec. 3.2.3, REFERENCE.md): ``Rc = Rs if IS_SAFETY(p) or Rs < 0.15 else Rh``, then
``LOGIT`` (inverse sigmoid, ``rlhf.losses.logit``) and ``WHITEN``. WHITEN uses the mean and unbiased variance
of the *global* batch: moments are all-reduced over the data-parallel group, so a DP2 run whitens exactly what
one process whitens.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from model import comm
from rlhf.losses import combined_reward, logit
from rlhf.ppo.rollout import Sample, chunks
from train.config_reader import ConfigError


class Scorer(Protocol):
    outputs: str

    def __call__(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> Tensor: ...


# ------------------------------------------------------------------------------------------ global moments


def _all_reduce(t: Tensor, group: Any) -> Tensor:
    return t if group is None else comm.all_reduce(t, group=group)


def global_masked_whiten(x: Tensor, mask: Tensor | None = None, *, group: Any = None, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and unbiased variance of the masked entries of ``x`` on
    every rank of ``group`` (two all-reduces; ``group=None``: this process alone). Masked-out entries -> 0."""
    m = torch.ones_like(x) if mask is None else (mask != 0).to(x.dtype)
    xm = x.masked_fill(m == 0, 0)
    first = _all_reduce(torch.stack([(xm * m).sum(), m.sum()]).double(), group)
    n = first[1]
    if n < 2:
        raise ValueError(f"whitening needs at least 2 values over all ranks, got {int(n)}")
    mean = (first[0] / n).to(x.dtype)
    sq = _all_reduce((((xm - mean) * m) ** 2).sum().double().reshape(1), group)
    var = (sq[0] / (n - 1)).to(x.dtype)
    return ((xm - mean) * torch.rsqrt(var + eps)) * m


def global_mean(values: Tensor, *, group: Any = None) -> float:
    """Mean over every rank's entries (each rank may hold a different count)."""
    t = _all_reduce(torch.stack([values.double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64)]),
                    group)
    return float(t[0] / t[1].clamp(min=1))


# --------------------------------------------------------------------------------------------- scorers


class TargetTokenScorer:
    """Share of answer tokens in a target set, Laplace-smoothed into (0, 1): ``(hits + 1) / (len + 2)``.

    A dense, learnable programmatic reward ("answers that contain the target words") for tiny-model tests.
    """

    outputs = "probability"

    def __init__(self, targets: Sequence[int], *, ignore: Sequence[int] = ()) -> None:
        self.targets, self.ignore = set(int(t) for t in targets), set(int(t) for t in ignore)

    def __call__(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> Tensor:
        out = []
        for answer in answers:
            tokens = [t for t in answer if t not in self.ignore]
            out.append((sum(t in self.targets for t in tokens) + 1.0) / (len(tokens) + 2.0))
        return torch.tensor(out)


class AvoidTokenScorer(TargetTokenScorer):
    """``1 - TargetTokenScorer``: a programmatic "safety" score that falls when forbidden tokens appear."""

    def __call__(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> Tensor:
        return 1.0 - super().__call__(prompts, answers)


class ConstantScorer:
    """The same score for every answer (``reward.safety = ""``: nothing is ever gated)."""

    outputs = "probability"

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> Tensor:
        return torch.full((len(answers),), float(self.value))


class KeywordScorer:
    """0.9 if the decoded answer contains ``word`` (case-insensitive), else 0.1."""

    outputs = "probability"

    def __init__(self, word: str, tokenizer: Any) -> None:
        self.word, self.tokenizer = word.lower(), tokenizer

    def __call__(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> Tensor:
        return torch.tensor([0.9 if self.word in self.tokenizer.decode(list(a)).lower() else 0.1 for a in answers])


class RewardModelScorer:
    """A frozen reward-model engine (``rlhf.reward.model.RewardObjective`` under TP x ZeRO) scoring prompt + answer
    token ids at the answer's last token, as the RM was trained (``rlhf.batching.encode_answer``).

    An answer cut at ``max_new_tokens`` gets the end token appended for scoring (the RM only ever saw finished
    answers); sequences longer than the RM's ``max_len`` keep BOS and their last ``max_len - 1`` tokens, as in
    training. Every data-parallel rank scores the same number of answers (ZeRO-3 forwards are collective).
    """

    outputs = "logit"

    def __init__(self, engine: Any, *, micro_batch_size: int, pad_id: int, end_id: int, max_len: int) -> None:
        self.engine, self.micro_batch_size, self.pad_id = engine, micro_batch_size, pad_id
        self.end_id, self.max_len = end_id, max_len

    def _ids(self, prompt: Sequence[int], answer: Sequence[int]) -> list[int]:
        ids = [*prompt, *answer]
        if not answer or answer[-1] != self.end_id:
            ids.append(self.end_id)
        return ids if len(ids) <= self.max_len else ids[:1] + ids[len(ids) - (self.max_len - 1):]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> Tensor:
        seqs = [self._ids(p, a) for p, a in zip(prompts, answers, strict=True)]
        out = []
        for part in chunks(seqs, self.micro_batch_size):
            ids = torch.full((len(part), max(len(s) for s in part)), self.pad_id, dtype=torch.long)
            for row, s in enumerate(part):
                ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            where = torch.tensor([len(s) - 1 for s in part])
            out.append(self.engine.forward(input_ids=ids, score_index=where).float().cpu())
        return torch.cat(out)


def build_scorer(spec: str, *, tokenizer: Any = None, **context: Any) -> Scorer:
    """A scorer from its config string: ``target_tokens:5,17``, ``avoid_tokens:3,4``, ``keyword:WORD``,
    ``constant:0.9``, ``module:callable`` (called with ``tokenizer=`` and ``**context``; returns a scorer).
    Reward-model checkpoints are built by the PPO trainer (they need an engine)."""
    kind, _, arg = spec.partition(":")
    if kind in ("target_tokens", "avoid_tokens"):
        ids = [int(x) for x in arg.split(",") if x.strip()]
        if not ids:
            raise ConfigError(f"reward scorer {spec!r}: give token ids, e.g. target_tokens:5,17,42")
        return TargetTokenScorer(ids) if kind == "target_tokens" else AvoidTokenScorer(ids)
    if kind == "keyword":
        if tokenizer is None:
            raise ConfigError(f"reward scorer {spec!r} decodes answers: set data.tokenizer")
        return KeywordScorer(arg, tokenizer)
    if kind == "constant":
        return ConstantScorer(float(arg))
    if kind and arg.isidentifier():
        try:
            factory = getattr(importlib.import_module(kind), arg)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward scorer {spec!r}: cannot import {arg} from {kind} ({err})") from None
        return factory(tokenizer=tokenizer, **context)
    raise ConfigError(f"reward scorer {spec!r}: use target_tokens:IDS, avoid_tokens:IDS, keyword:WORD, "
                      "constant:P, module:callable, or a reward-model checkpoint directory")


# -------------------------------------------------------------------------------------- combined reward


@dataclass
class RewardResult:
    score: Tensor
    """[n] the sequence reward PPO uses (before the KL penalty): WHITEN(LOGIT(Rc)) by default."""
    helpful: Tensor
    """[n] Rh as a probability."""
    safety: Tensor
    """[n] Rs as a probability."""
    combined: Tensor
    """[n] Rc (the gated one of the two)."""
    used_safety: Tensor
    """[n] bool: Rc came from the safety model (safety prompt, or Rs below the threshold)."""


def _probability(scorer: Any, values: Tensor) -> Tensor:
    return torch.sigmoid(values.float()) if getattr(scorer, "outputs", "probability") == "logit" else values.float()


class RewardStage:
    """Scores samples with both scorers and returns Llama 2's gated, LOGIT-ed and globally whitened reward."""

    def __init__(self, *, helpful: Any, safety: Any = None, kind: str = "llama2", threshold: float = 0.15,
                 whiten: bool = True, group: Any = None) -> None:
        if kind not in ("llama2", "single"):
            raise ValueError(f"reward kind {kind!r}: use 'llama2' or 'single'")
        self.helpful, self.safety = helpful, safety if safety is not None else ConstantScorer(1.0)
        self.kind, self.threshold, self.whiten, self.group = kind, threshold, whiten, group

    def __call__(self, samples: Sequence[Sample], *, whiten: bool | None = None) -> RewardResult:
        """Score ``samples`` (this rank's); ``whiten`` overrides the stage's setting (held-out evaluation)."""
        prompts = [s.prompt.ids for s in samples]
        answers = [s.answer for s in samples]
        rh = _probability(self.helpful, self.helpful(prompts, answers))
        if self.kind == "single":
            rs, used = torch.ones_like(rh), torch.zeros(len(samples), dtype=torch.bool)
            rc = rh
        else:
            rs = _probability(self.safety, self.safety(prompts, answers))
            is_safety = torch.tensor([s.prompt.is_safety for s in samples], dtype=torch.bool)
            rc = combined_reward(rh, rs, is_safety, threshold=self.threshold)
            used = is_safety | (rs < self.threshold)
        score = logit(rc)
        if self.whiten if whiten is None else whiten:
            score = global_masked_whiten(score, group=self.group)
        return RewardResult(score=score, helpful=rh, safety=rs, combined=rc, used_safety=used)
