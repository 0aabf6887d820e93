"""The DPO losses of rlhf/losses.py against a float64 full-batch reference, TRL's ``DPOTrainer`` loss on the same
log-probs, and hand-computed numbers for the Llama 3 variant (run: ``pytest tests/unit/test_dpo_loss.py``).

TRL 1.16 has no free-standing DPO loss function: its loss lives in ``DPOTrainer._compute_loss``, which calls the
model for per-token log-probs. We call that method with a stand-in model that returns *our* per-token log-probs
(and a minimal trainer state), so TRL's own arithmetic (sums over the completion mask, log-ratios, its loss
formulas, its batch mean) runs on exactly the numbers our loss sees; gradients are compared through autograd.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhf.losses import chosen_nll, dpo_loss, sequence_logps, without_formatting_tokens

pytestmark = pytest.mark.timeout(120)
TOL = 1e-6


def batch(seed: int = 0, b: int = 4, t: int = 9) -> dict[str, torch.Tensor]:
    """Per-token log-probs of chosen (rows 0..b-1) and rejected (b..2b-1) answers, with ragged answer masks."""
    g = torch.Generator().manual_seed(seed)
    token_logps = -torch.rand(2 * b, t, generator=g, dtype=torch.float64) * 3
    ref_logps = token_logps.detach() - 0.3 * torch.randn(2 * b, t, generator=g, dtype=torch.float64)
    mask = torch.zeros(2 * b, t, dtype=torch.float64)
    for row in range(2 * b):
        start = int(torch.randint(1, 4, (1,), generator=g))
        stop = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        mask[row, start:stop] = 1
    return {"token_logps": token_logps.float(), "ref_logps": ref_logps.float(), "mask": mask.float()}


def ours(data: dict[str, torch.Tensor], **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, gradient wrt the policy's per-token log-probs) of rlhf.losses."""
    logps = data["token_logps"].clone().requires_grad_(True)
    seq, ref = sequence_logps(logps, data["mask"]), sequence_logps(data["ref_logps"], data["mask"])
    b = seq.shape[0] // 2
    counts = data["mask"].sum(-1)
    terms = dpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], chosen_tokens=counts[:b], rejected_tokens=counts[b:],
                     **kwargs)
    loss = terms.losses.mean()
    loss.backward()
    return loss.detach(), logps.grad


def full_batch_reference(data: dict[str, torch.Tensor], *, beta: float, loss_type: str = "sigmoid",
                         label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook formulas, written out per pair in float64 (autograd only for the gradient)."""
    logps = data["token_logps"].double().clone().requires_grad_(True)
    ref, mask = data["ref_logps"].double(), data["mask"].double()
    b = logps.shape[0] // 2
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        c, r = i, i + b
        hc = (logps[c] * mask[c]).sum() - (ref[c] * mask[c]).sum()
        hr = (logps[r] * mask[r]).sum() - (ref[r] * mask[r]).sum()
        if loss_type == "sigmoid":
            z = beta * (hc - hr)
            term = -(1 - label_smoothing) * torch.log(torch.sigmoid(z)) - label_smoothing * torch.log(
                torch.sigmoid(-z))
        else:
            term = (hc / mask[c].sum() - hr / mask[r].sum() - 1 / (2 * beta)) ** 2
        total = total + term
    loss = total / b
    loss.backward()
    return loss.detach(), logps.grad


@pytest.mark.parametrize(("loss_type", "beta", "eps"), [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                         ("ipo", 0.1, 0.0)])
def test_dpo_matches_full_batch_reference(loss_type: str, beta: float, eps: float) -> None:
    data = batch(1)
    loss, grad = ours(data, beta=beta, loss_type=loss_type, label_smoothing=eps)
    ref_loss, ref_grad = full_batch_reference(data, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert abs(float(loss) - float(ref_loss)) <= TOL * max(1.0, abs(float(ref_loss)))
    assert float((grad.double() - ref_grad).abs().max()) <= TOL


# ------------------------------------------------------------------------------------------------ TRL's loss
def trl_loss(data: dict[str, torch.Tensor], *, beta: float, loss_type: str,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL ``DPOTrainer._compute_loss`` on our per-token log-probs: (loss, gradient wrt them)."""
    pytest.importorskip("trl", reason="TRL is the DPO test peer (pip install -e '.[dev]')")
    from trl import DPOTrainer

    logps = data["token_logps"].clone().requires_grad_(True)
    mask, ref = data["mask"], data["ref_logps"]
    rows, t = logps.shape
    # TRL's completion_mask is over input positions; its shifted form [:, 1:] masks the per-token log-probs.
    completion_mask = torch.cat([torch.zeros(rows, 1), mask], dim=1).long()
    ref_seq = sequence_logps(ref, mask)

    def model(**kwargs: object) -> SimpleNamespace:
        zeros = torch.zeros(rows, t)
        return SimpleNamespace(log_probs=logps * mask, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros(rows, t, dtype=torch.bool))

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": _Metrics()},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(rows, t + 1, dtype=torch.long), "attention_mask": completion_mask,
              "completion_mask": completion_mask, "ref_chosen_logps": ref_seq[: rows // 2],
              "ref_rejected_logps": ref_seq[rows // 2:]}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    return loss.detach(), logps.grad


class _Metrics(dict):
    def __missing__(self, key: str) -> list:
        self[key] = []
        return self[key]


def swapped(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b = data["token_logps"].shape[0] // 2
    return {k: torch.cat([v[b:], v[:b]]) for k, v in data.items()}


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 1.0), ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_matches_trl(loss_type: str, beta: float) -> None:
    data = batch(2)
    loss, grad = ours(data, beta=beta, loss_type=loss_type)
    trl, trl_grad = trl_loss(data, beta=beta, loss_type=loss_type)
    assert abs(float(loss) - float(trl)) <= TOL * max(1.0, abs(float(trl)))
    assert float((grad - trl_grad).abs().max()) <= TOL


def test_conservative_dpo_matches_trl_on_both_label_orders() -> None:
    """cDPO = (1 - eps) DPO(chosen, rejected) + eps DPO(rejected, chosen); TRL 1.16's "sigmoid" has no label
    smoothing term, so it is evaluated on both label orders and mixed."""
    data, eps, beta = batch(3), 0.15, 0.3
    loss, grad = ours(data, beta=beta, label_smoothing=eps)
    forward, g_forward = trl_loss(data, beta=beta, loss_type="sigmoid")
    backward, g_backward = trl_loss(swapped(data), beta=beta, loss_type="sigmoid")
    b = grad.shape[0] // 2
    g_backward = torch.cat([g_backward[b:], g_backward[:b]])
    assert abs(float(loss) - ((1 - eps) * float(forward) + eps * float(backward))) <= TOL
    assert float((grad - ((1 - eps) * g_forward + eps * g_backward)).abs().max()) <= TOL


# ---------------------------------------------------------------------------------------- Llama 3 variant
def test_formatting_tokens_and_nll_by_hand() -> None:
    """Two pairs of 3-token answers whose last token is <|eot_id|> (id 9): masked from DPO, kept in the NLL."""
    eot, beta, w = 9, 0.1, 0.2
    labels = torch.tensor([[5, 6, eot], [7, eot, 0], [5, 8, eot], [6, eot, 0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.25, -0.75, -9.0], [-3.0, -1.0, -0.1], [-2.0, -0.2, float("nan")]])
    ref = torch.tensor([[-1.5, -2.0, -0.4], [-0.5, -0.5, -9.0], [-2.0, -1.5, -0.1], [-1.0, -0.3, float("nan")]])
    dpo_mask = without_formatting_tokens(labels, mask, [eot])
    assert dpo_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]
    pol, rf = sequence_logps(logp, dpo_mask), sequence_logps(ref, dpo_mask)
    terms = dpo_loss(pol[:2], pol[2:], rf[:2], rf[2:], beta=beta)
    # pair 0: chosen ratio (-1-2) - (-1.5-2) = 0.5; rejected (-3-1) - (-2-1.5) = -0.5 -> z = 0.1
    # pair 1: chosen -0.25 - -0.5 = 0.25; rejected -2 - -1 = -1 -> z = 0.125
    expected_dpo = [-math.log(1 / (1 + math.exp(-0.1))), -math.log(1 / (1 + math.exp(-0.125)))]
    assert torch.allclose(terms.losses.double(), torch.tensor(expected_dpo, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(terms.chosen_rewards, torch.tensor([0.05, 0.025]))
    assert torch.allclose(terms.rejected_rewards, torch.tensor([-0.05, -0.1]))
    # NLL of the chosen answers over all their tokens (eot included): (1+2+0.5)/3 and (0.25+0.75)/2
    nll = chosen_nll(sequence_logps(logp[:2], mask[:2]), mask[:2].sum(-1))
    assert torch.allclose(nll, torch.tensor([3.5 / 3, 0.5]))
    total = (terms.losses + w * nll).mean()
    assert abs(float(total) - (sum(expected_dpo) + w * (3.5 / 3 + 0.5)) / 2) <= 1e-6


def test_bad_arguments_name_the_fix() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_large_margins_stay_finite() -> None:
    big = torch.tensor([4000.0])
    terms = dpo_loss(-big, big, torch.zeros(1), torch.zeros(1), beta=1.0)
    assert torch.isfinite(terms.losses).all() and float(terms.losses) == pytest.approx(8000.0)
    assert float(F.logsigmoid(torch.tensor(8000.0))) == 0.0
