"""Benchmark: our Llama vs Hugging Face ``LlamaForCausalLM`` on identical weights, same process, fp32 CPU.

    python benchmarks/bench_model.py [--output benchmarks/results/bench_model.json] [--repeats 5]

1. Forward + backward of a ~25M-parameter Llama (``bench_25m``: dim 512, 8 layers, 8 heads, 4 kv heads),
   batch 4 x 512 tokens. Goal: ours / HF time <= 0.9.
2. KV-cache generation of 256 new tokens for a batch of 8 prompts, greedy. Goal: ours tokens/s >= 1.2x
   HF ``generate`` (static sampling settings, ``use_cache=True``).
Timings alternate between the two models (ABAB...) and report the median, so drift in machine load hits
both equally. Weights go through our real HF converter, and outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from model.checkpoints.hf import hf_config_from_llama, to_hf_state_dict
from model.config import get_config
from model.generate import generate
from model.llama import Llama, init_llama_weights


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


def _median_times(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_train_step(ours: Llama, hf: torch.nn.Module, *, batch: int, seq: int, repeats: int) -> dict:
    vocab = ours.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    ours.train()
    hf.train()
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()

    def step_ours() -> None:
        logits = ours(tokens)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        ours.zero_grad(set_to_none=True)

    def step_hf() -> None:
        hf(tokens, labels=tokens).loss.backward()
        hf.zero_grad(set_to_none=True)

    times = _median_times({"ours": step_ours, "hf": step_hf}, repeats)
    return {"batch": batch, "seq": seq, "max_abs_logit_diff": diff, "ours_s": times["ours"], "hf_s": times["hf"],
            "ratio_ours_over_hf": times["ours"] / times["hf"], "goal": "<= 0.9"}


def bench_generation(ours: Llama, hf: torch.nn.Module, *, batch: int, new_tokens: int, repeats: int) -> dict:
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
    times = _median_times({"ours": run_ours, "hf": run_hf}, repeats)
    tokens = batch * new_tokens
    return {"batch": batch, "new_tokens": new_tokens, "greedy_outputs_identical": agree,
            "ours_tokens_per_s": tokens / times["ours"], "hf_tokens_per_s": tokens / times["hf"],
            "speedup_ours_over_hf": times["hf"] / times["ours"], "goal": ">= 1.2"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_model.json"))
    parser.add_argument("--config", default="bench_25m")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    ours, hf = build_pair(args.config, seed=0)
    result = {
        "benchmark": "model_vs_transformers",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "config": args.config, "params": ours.num_params(), "dtype": "fp32",
        "train_step": bench_train_step(ours, hf, batch=4, seq=512, repeats=args.repeats),
        "generation": bench_generation(ours, hf, batch=8, new_tokens=256, repeats=max(2, args.repeats // 2)),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
