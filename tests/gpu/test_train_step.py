"""bf16 training on the GPU with the document mask (FlexAttention, no dense mask) and without it (flash).

- FlexAttention equals SDPA with the dense document mask on the GPU, forward AND backward (the backward does
  not run on CPUs), fp32 with TF32 off: within 1e-5 of the largest value;
- a bf16 forward + backward with the document mask never builds the dense ``[b, 1, s, s]`` mask and tracks
  the fp32 dense reference within 3e-2 (logits) and 6e-2 (gradients), relative to the largest value;
- plain causal bf16 attention runs on SDPA's flash kernel (restricted to it, SDPA would raise otherwise);
- the activation memory of a bf16 block with the document mask is the planner's (``activation_bytes_per_token``)
  within 10% (``torch.cuda.memory_allocated`` around the forward);
- ``python -m train`` in bf16 with the document mask trains (8 steps, loss down, every record finite).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from launch.planner import Layout, activation_bytes_per_token
from model import attention
from model.attention import AttentionMask, choose_kernel
from model.config import get_config
from model.llama import Llama, init_llama_weights
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def _model(name: str, device: torch.device, dtype: torch.dtype) -> Llama:
    model = Llama(get_config(name))
    init_llama_weights(model, seed=0)
    return model.to(device=device, dtype=dtype)


def _batch(cfg, device: torch.device, b: int = 2, s: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
    documents = torch.cumsum((torch.rand(b, s, generator=gen) < 0.01).long(), 1)  # ~100-token documents
    return tokens.to(device), documents.to(device)


def _loss_and_grads(model: Llama, tokens: torch.Tensor, documents: torch.Tensor | None):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, document_ids=documents)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    return logits.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _dense_reference(model: Llama, tokens: torch.Tensor, documents: torch.Tensor):
    for block in model.layers:
        block.attention.kernel = attention.SDPAAttention()
    try:
        return _loss_and_grads(model, tokens, documents)
    finally:
        for block in model.layers:
            block.attention.kernel = None


def test_flex_equals_the_dense_mask_forward_and_backward(cuda_only: torch.device) -> None:
    model = _model("debug_llama3_tiny", cuda_only, torch.float32)
    tokens, documents = _batch(model.config, cuda_only)
    q = torch.empty(1, 2, 1, 16, device=cuda_only)
    assert choose_kernel(q, q, q, AttentionMask(document_ids=documents[:, :2])).name == "flex_document"
    flex_logits, flex_grads = _loss_and_grads(model, tokens, documents)
    dense_logits, dense_grads = _dense_reference(model, tokens, documents)
    assert _rel(flex_logits, dense_logits) <= 1e-5
    for name, grad in dense_grads.items():
        assert _rel(flex_grads[name], grad) <= 1e-5, name


def test_bf16_document_mask_without_a_dense_mask(cuda_only: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _model("bench_25m", cuda_only, torch.float32)
    tokens, documents = _batch(reference.config, cuda_only, s=1024)
    ref_logits, ref_grads = _dense_reference(reference, tokens, documents)
    model = _model("bench_25m", cuda_only, torch.bfloat16)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("the dense [b, 1, s, s] document mask was built on the GPU path")

    monkeypatch.setattr(attention, "document_causal_mask", no_dense_mask)
    logits, grads = _loss_and_grads(model, tokens, documents)
    assert _rel(logits, ref_logits) <= 3e-2
    worst = max(_rel(grads[n], g) for n, g in ref_grads.items())
    assert worst <= 6e-2, worst


def test_plain_causal_bf16_runs_the_flash_kernel(cuda_only: torch.device) -> None:
    model = _model("bench_25m", cuda_only, torch.bfloat16)
    tokens, _ = _batch(model.config, cuda_only, s=1024)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # no fallback: raises if flash cannot take this call
        logits, grads = _loss_and_grads(model, tokens, None)
    assert torch.isfinite(logits).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_document_mask_activation_memory_is_the_planners(cuda_only: torch.device) -> None:
    cfg = get_config("bench_25m")
    model = _model("bench_25m", cuda_only, torch.bfloat16)
    b, s = 2, 2048
    _, documents = _batch(cfg, cuda_only, b=b, s=s)
    x = torch.randn(b, s, cfg.dim, device=cuda_only, dtype=torch.bfloat16, requires_grad=True)
    rope = model.rotary(torch.arange(s, device=cuda_only)[None].expand(b, s))
    mask = AttentionMask(document_ids=documents)
    model.layers[0](x, rope, mask=AttentionMask(document_ids=documents))  # compile FlexAttention first
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = model.layers[0](x, rope, mask=mask)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    planned = activation_bytes_per_token(cfg, Layout(flash_attention=True, fused_norm=False), s) * b * s
    assert abs(kept - planned) <= 0.10 * planned, (kept, planned)


def test_bf16_training_run_with_the_document_mask(cuda: torch.device, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--config", "configs/pretrain/tiny_cpu.toml", "--train.dtype=bf16",
           "--data.document_mask=true", "--data.seq_len=256", "--train.steps=8", "--optim.warmup_steps=2",
           "--train.eval_every=0", "--checkpoint.every=0", f"--run.dir={run}"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("type") == "train"]
    assert len(steps) == 8 and not any(r["skipped"] for r in steps)
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss", "grad_norm", "mfu"))
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1
