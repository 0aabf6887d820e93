"""Distillation losses (rlhf/distill/losses.py) against full-vocabulary references and TRL's GKD loss.

    python -m pytest -q tests/unit/test_distill_losses.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf.distill.losses import argmax_agreement, distill_token_loss, teacher_topk

pytestmark = pytest.mark.timeout(60)
VOCAB = 37


def logits_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 5, VOCAB, generator=g, dtype=torch.float64) * 2).float().requires_grad_(True)
    teacher = (torch.randn(2, 5, VOCAB, generator=g, dtype=torch.float64) * 3).float()
    return student, teacher


def reference_forward_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2 per token, float64, by the textbook formula."""
    p = F.softmax(teacher.double() / t, -1)
    return (p * (p.log() - F.log_softmax(student.double() / t, -1))).sum(-1) * t * t


def reference_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    q = F.softmax(student.double() / t, -1)
    return (q * (q.log() - F.log_softmax(teacher.double() / t, -1))).sum(-1) * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind,reference", [("forward_kl", reference_forward_kl), ("reverse_kl", reference_reverse_kl)])
def test_topk_at_full_vocab_equals_reference_value_and_gradient(kind, reference, temperature: float) -> None:
    student, teacher = logits_pair()
    values, indices = teacher_topk(teacher, k=VOCAB)
    ours = distill_token_loss(student, values, indices, kind=kind, temperature=temperature)
    (grad_ours,) = torch.autograd.grad(ours.sum(), student)
    ref = reference(student, teacher, temperature)
    (grad_ref,) = torch.autograd.grad(ref.sum(), student)
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=0)
    assert torch.allclose(grad_ours.double(), grad_ref.double(), atol=1e-6, rtol=0)


def test_topk_forward_kl_is_kl_of_the_renormalised_teacher() -> None:
    student, teacher = logits_pair(1)
    values, indices = teacher_topk(teacher, k=5)
    assert torch.equal(values, teacher.topk(5, -1).values) and torch.equal(indices, teacher.topk(5, -1).indices)
    ours = distill_token_loss(student, values, indices, kind="forward_kl")
    # Reference: teacher probabilities zero outside its top-5, renormalised; student's full softmax.
    masked = torch.full_like(teacher, float("-inf")).scatter(-1, indices, values).double()
    p = F.softmax(masked, -1)
    log_s = F.log_softmax(student.double(), -1)
    ref = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - log_s), torch.zeros_like(p)).sum(-1)
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=0)
    assert bool((ours < reference_forward_kl(student, teacher, 1.0).float() + 10).all())


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_equals_trl_generalized_jsd(beta: float) -> None:
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    student, teacher = logits_pair(2)
    values, indices = teacher_topk(teacher, k=VOCAB)
    ours = distill_token_loss(student, values, indices, kind="jsd", beta=beta, temperature=2.0) / 4.0
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=2.0, reduction="sum")
    (grad_ours,) = torch.autograd.grad(ours.sum(), student)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    assert abs(ours.sum().item() - theirs.item()) <= 1e-4
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6, rtol=0)


def test_agreement_and_bad_kind() -> None:
    student, teacher = logits_pair(3)
    _, indices = teacher_topk(teacher, k=3)
    agree = argmax_agreement(teacher, indices)
    assert agree.shape == (2, 5) and bool((agree == 1).all())
    with pytest.raises(ValueError, match="distill.loss='kl'"):
        distill_token_loss(student, *teacher_topk(teacher, k=3), kind="kl")
