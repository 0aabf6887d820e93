"""Benchmark: our Llama vs Hugging Face ``LlamaForCausalLM`` on identical weights, same process, fp32 CPU.

    python benchmarks/bench_model.py [--output benchmarks/results/bench_model.json] [--repeats 7] [--threads N]

1. Forward + backward of a ~25M-parameter Llama (``bench_25m``: dim 512, 8 layers, 8 heads, 4 kv heads),
   batch 4 x 512 tokens, mean next-token cross entropy. Goal: ours / HF time <= 0.9.
2. KV-cache generation of 256 new tokens for a batch of 8 prompts, greedy. Goal: ours tokens/s >= 1.2x
   HF ``generate`` (its defaults otherwise: dynamic cache, ``use_cache=True``).
Both models run with the same torch thread count (``--threads``, default: torch's default, one per core).
Timings alternate between the two models (ABAB...) after a warm-up of each, and report the median, so drift
in machine load hits both equally; the load average before and after is recorded, because on a shared machine
it says how far to trust the absolute numbers. Weights go through our real HF converter, and the benchmark
stops before any timing (exit status 1, nothing written) unless the two models agree: logits, loss and every
parameter gradient to float rounding (``check_same_outputs``), greedy tokens exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from model import kernels
from model.checkpoints.hf import hf_config_from_llama, to_hf_state_dict
from model.config import get_config
from model.generate import generate
from model.llama import Llama, init_llama_weights
from train.metrics import cpu_name

# fp32, the same math in another order (fused kernels / oneDNN vs HF's eager modules): the largest difference
# seen is ~1e-6 of the largest value; 1e-4 leaves room for other CPUs while a wrong weight or mask is O(1).
RELATIVE_TOLERANCE = 1e-4


def build_pair(name: str, *, seed: int) -> tuple[Llama, torch.nn.Module]:
    import transformers

    cfg = get_config(name)
    ours = Llama(cfg)
    init_llama_weights(ours, seed=seed)
    hf_cfg = transformers.LlamaConfig(**hf_config_from_llama(cfg))
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    return ours, hf


def _median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def _relative_gap(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def check_same_outputs(ours: Llama, hf: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Relative gaps of logits, loss and the largest parameter-gradient gap; SystemExit above the tolerance.

    Gradients are compared through the same converter as the weights (HF names and layouts)."""
    gaps: dict[str, float] = {}
    for model in (ours, hf):
        model.zero_grad(set_to_none=True)
    logits = ours(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100)
    loss.backward()
    hf_out = hf(tokens, labels=tokens)
    hf_out.loss.backward()
    gaps["logits"] = _relative_gap(logits.detach(), hf_out.logits.detach())
    gaps["loss"] = _relative_gap(loss.detach(), hf_out.loss.detach())
    ours_grads = to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, ours.config)
    hf_grads = dict(hf.named_parameters())
    gaps["gradients_max"] = max(_relative_gap(g, hf_grads[n].grad) for n, g in ours_grads.items() if n in hf_grads)
    for model in (ours, hf):
        model.zero_grad(set_to_none=True)
    bad = {k: v for k, v in gaps.items() if not v <= RELATIVE_TOLERANCE}
    if bad:
        raise SystemExit(f"bench_model: the two models disagree before timing ({bad}, tolerance "
                         f"{RELATIVE_TOLERANCE} of the largest value): not the same weights or math; nothing timed")
    return gaps


def bench_train_step(ours: Llama, hf: torch.nn.Module, *, batch: int, seq: int, repeats: int) -> dict[str, object]:
    vocab = ours.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    ours.train()
    hf.train()
    # Next-token labels with the last position ignored, as HF's loss does: the loss then reads the logits
    # as they are, instead of copying the [b, s-1, vocab] slice out of them.
    labels = torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=-100).flatten()
    gaps = check_same_outputs(ours, hf, tokens, labels)

    def step_ours() -> None:
        logits = ours(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100).backward()
        ours.zero_grad(set_to_none=True)

    def step_hf() -> None:
        hf(tokens, labels=tokens).loss.backward()
        hf.zero_grad(set_to_none=True)

    times = _median_times({"ours": step_ours, "hf": step_hf}, repeats)
    ratio = times["ours"] / times["hf"]
    return {"batch": batch, "seq": seq, "relative_gaps_before_timing": gaps, "ours_s": times["ours"],
            "hf_s": times["hf"],
            "ratio_ours_over_hf": ratio, "goal": "<= 0.9", "goal_met": ratio <= 0.9}


def bench_generation(ours: Llama, hf: torch.nn.Module, *, batch: int, new_tokens: int,
                     repeats: int) -> dict[str, object]:
    ours.eval()
    hf.eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, ours.config.vocab_size, (16,), generator=gen).tolist() for _ in range(batch)]
    prompt_tensor = torch.tensor(prompts)

    def run_ours() -> list[list[int]]:
        return generate(ours, prompts, max_new_tokens=new_tokens, temperature=0.0)

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(prompt_tensor, attention_mask=torch.ones_like(prompt_tensor), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                               pad_token_id=0, eos_token_id=None)

    agree = run_ours() == run_hf()[:, 16:].tolist()
    if not agree:
        raise SystemExit("bench_model: greedy generations differ between the two models; nothing timed")
    times = _median_times({"ours": run_ours, "hf": run_hf}, repeats)
    tokens = batch * new_tokens
    speedup = times["hf"] / times["ours"]
    return {"batch": batch, "new_tokens": new_tokens, "greedy_outputs_identical": agree,
            "ours_tokens_per_s": tokens / times["ours"], "hf_tokens_per_s": tokens / times["hf"],
            "speedup_ours_over_hf": speedup, "goal": ">= 1.2", "goal_met": speedup >= 1.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_model.json"))
    parser.add_argument("--config", default="bench_25m")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both models (0: torch default)")
    args = parser.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    ours, hf = build_pair(args.config, seed=0)
    result = {
        "benchmark": "model_vs_transformers",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "fused_cpu_kernels": kernels.enabled(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "config": args.config, "params": ours.num_params(), "dtype": "fp32",
        "train_step": bench_train_step(ours, hf, batch=4, seq=512, repeats=args.repeats),
        "generation": bench_generation(ours, hf, batch=8, new_tokens=256, repeats=max(3, args.repeats // 2)),
    }
    result["load_average_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    t, g = result["train_step"], result["generation"]
    print(f"forward+backward: ours {t['ours_s']:.3f} s, HF {t['hf_s']:.3f} s, ours/HF {t['ratio_ours_over_hf']:.3f} "
          f"(goal <= 0.9: {'met' if t['goal_met'] else 'NOT met'})")
    print(f"generation: ours {g['ours_tokens_per_s']:.1f} tok/s, HF {g['hf_tokens_per_s']:.1f} tok/s, "
          f"ours/HF {g['speedup_ours_over_hf']:.2f}x (goal >= 1.2: {'met' if g['goal_met'] else 'NOT met'})")



if __name__ == "__main__":
    main()
