"""Distillation divergences per token, on the teacher's top-k logits (k = vocab is the full-vocabulary loss).

    from rlhf.distill.losses import teacher_topk, distill_token_loss
    values, indices = teacher_topk(teacher_logits, k=64)                 # [b, s, k] logits and vocabulary ids
    per_token = distill_token_loss(student_logits, values, indices, kind="forward_kl", temperature=2.0)

The teacher's distribution is its softmax *renormalised over its top-k* (``p_t = softmax(values / T)``), which is
exact at ``k = vocab`` and keeps the offline files and the teacher->student traffic at k values per token.

    forward_kl   KL(p_t || p_s) = sum_K p_t (log p_t - log p_s), p_s the student's *full-vocabulary* softmax read at
                 the k ids (mass the student puts elsewhere is penalised through its normaliser)
    reverse_kl   KL(q_s || p_t), q_s the student's softmax renormalised over the same k ids (outside them p_t = 0)
    jsd          generalised JSD of GKD (Agarwal et al. 2024, TRL's ``generalized_jsd_loss``):
                 beta KL(p_t || m) + (1 - beta) KL(q_s || m), m = beta p_t + (1 - beta) q_s; beta = 0 is forward KL,
                 beta = 1 reverse KL (TRL's special cases)

All at temperature T on both sides; the objective multiplies by T^2 (Hinton et al. 2015) so gradients keep their
scale across temperatures. Under tensor parallelism the student's logits are vocabulary-parallel: its normaliser
and the logits at the teacher's ids are all-reduced over the TP group (never gathered), and a TP teacher's top-k
is each rank's top-k merged (``teacher_topk(group=...)``). Everything is computed in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("forward_kl", "reverse_kl", "jsd")


def teacher_topk(logits: Tensor, k: int, *, group: Any = None, tp_size: int = 1, tp_rank: int = 0) -> tuple[Tensor, Tensor]:
    """``(values fp32, indices int64)`` of the top ``k`` logits over the vocabulary, sorted descending.

    With ``tp_size > 1`` the logits are this rank's vocabulary slice: each rank's top-k (global ids) is
    all-gathered over ``group`` and the top-k of those is taken (the full logits are never gathered)."""
    logits = logits.float()
    local = logits.shape[-1]
    values, indices = logits.topk(min(k, local), dim=-1)
    if tp_size > 1:
        from model import comm

        indices = indices + tp_rank * local
        values = torch.cat(comm.all_gather(values.contiguous(), group=group), dim=-1)
        indices = torch.cat(comm.all_gather(indices.contiguous(), group=group), dim=-1)
        values, order = values.topk(min(k, values.shape[-1]), dim=-1)
        indices = indices.gather(-1, order)
    return values, indices


def student_logits_at(logits: Tensor, indices: Tensor, *, group: Any = None, tp_size: int = 1,
                      tp_rank: int = 0) -> tuple[Tensor, Tensor]:
    """``(logits at indices [b, s, k], logsumexp over the full vocabulary [b, s, 1])`` in fp32, differentiable.

    Vocabulary-parallel when ``tp_size > 1``: each rank contributes the ids in its range (zeros elsewhere) and its
    share of the normaliser; both are summed over the TP group (megatron's reduce region: all-reduce forward,
    identity backward, which is the exact gradient of a sum of per-rank terms)."""
    logits = logits.float()
    if tp_size == 1:
        return logits.gather(-1, indices), torch.logsumexp(logits, dim=-1, keepdim=True)
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    from model import comm

    local = logits.shape[-1]
    lo = tp_rank * local
    owned = (indices >= lo) & (indices < lo + local)
    picked = logits.gather(-1, (indices - lo).clamp(0, local - 1)) * owned
    picked = reduce_from_tensor_model_parallel_region(picked, group=group)
    peak = comm.all_reduce(logits.detach().amax(dim=-1, keepdim=True), op="max", group=group)
    total = reduce_from_tensor_model_parallel_region((logits - peak).exp().sum(-1, keepdim=True), group=group)
    return picked, total.log() + peak


def divergence(student_at: Tensor, student_lse: Tensor, teacher_values: Tensor, *, kind: str, temperature: float,
               beta: float = 0.5) -> Tensor:
    """Per-token divergence ``[b, s]`` (see the module docstring); inputs from ``student_logits_at`` computed on
    ``student_logits / temperature`` and the teacher's top-k logits."""
    log_p_t = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    if kind == "forward_kl":
        log_p_s = student_at - student_lse
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    log_q_s = F.log_softmax(student_at, dim=-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (log_q_s.exp() * (log_q_s - log_p_t)).sum(-1)
    if kind != "jsd":
        raise ValueError(f"distill.loss={kind!r}: use one of {list(KINDS)}")
    if beta == 0.0:
        return (log_p_t.exp() * (log_p_t - log_q_s)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_q_s + math.log1p(-beta), log_p_t + math.log(beta)]), dim=0)
    kl_teacher = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
    kl_student = (log_q_s.exp() * (log_q_s - log_m)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def distill_token_loss(student_logits: Tensor, teacher_values: Tensor, teacher_indices: Tensor, *, kind: str,
                       temperature: float = 1.0, beta: float = 0.5, group: Any = None, tp_size: int = 1,
                       tp_rank: int = 0) -> Tensor:
    """``T^2 x divergence`` per token ``[b, s]`` between the student's logits (vocab-parallel under TP) and the
    teacher's top-k ``(values, indices)``."""
    at, lse = student_logits_at(student_logits.float() / temperature, teacher_indices, group=group,
                                tp_size=tp_size, tp_rank=tp_rank)
    return divergence(at, lse, teacher_values, kind=kind, temperature=temperature, beta=beta) * temperature**2


def argmax_agreement(student_logits: Tensor, teacher_indices: Tensor) -> Tensor:
    """Per token, 1.0 where the student's argmax is the teacher's (``teacher_indices[..., 0]``), full vocab logits."""
    return (student_logits.argmax(-1) == teacher_indices[..., 0]).float()
