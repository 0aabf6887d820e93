"""Benchmark: what LoRA keeps in the optimizer, measured in the real SFT engine (full fine-tuning vs LoRA).

    python benchmarks/bench_lora_memory.py [--model debug_15m --rank 8] [--output benchmarks/results/bench_lora_memory.json]

Each mode is one fresh process (so its peak RSS is its own) running ``rlhf.sft`` for a few steps with the default
engine (``train.engine.TrainEngine``: DeepSpeed, one process, fp32) on synthetic dialogues (``rlhf.synthetic``:
no shared data needed) and a seeded random init of ``--model``. After training the worker reads the engine itself:

    adam_state_bytes       every tensor in the optimizer's state (exp_avg + exp_avg_sq), summed
    optimizer_param_bytes  the tensors the optimizer steps (its param_groups)
    trainable_params       parameters with requires_grad in the trained module
    frozen_bytes           the frozen base weights (no gradient, no optimizer state)
    peak_rss_mib           the process's peak resident memory (ru_maxrss): weights, activations, libraries and
                           transients (e.g. the bf16 base is cast from fp32 at load) included

Modes: ``full`` (every weight trains), ``lora`` (``[lora] rank=R`` on q,k,v,o,gate,up,down, fp32 base) and
``lora_bf16`` (the same with ``base_dtype=bf16``). The acceptance figure is ``adam_state_bytes``: LoRA's must be
exactly 2 x 4 bytes x the adapters' parameter count, and the full run's 2 x 4 bytes x the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = "q,k,v,o,gate,up,down"
MODES = {"full": [], "lora": ["--lora.rank={rank}", "--lora.alpha={alpha}", f"--lora.targets={TARGETS}"],
         "lora_bf16": ["--lora.rank={rank}", "--lora.alpha={alpha}", f"--lora.targets={TARGETS}",
                       "--lora.base_dtype=bf16"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="debug_15m")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_lora_memory")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "bench_lora_memory.json")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_data(root: Path) -> None:
    from rlhf.synthetic import synthetic_tokenizer, write_synthetic_preferences

    root.mkdir(parents=True, exist_ok=True)
    synthetic_tokenizer(root / "tok")
    write_synthetic_preferences(root / "prefs.jsonl", n=64, seed=3, graded=False)


def worker(args: argparse.Namespace) -> dict:
    """One mode in this process: train, then read the engine's optimizer and gradients."""
    import resource

    import torch

    from rlhf.sft.config import SFTConfig
    from rlhf.sft.train import run_sft
    from train.hooks import default_engine

    torch.set_num_threads(1)
    mode, data = args.worker, args.work / "data"
    extra = [a.format(rank=args.rank, alpha=2 * args.rank) for a in MODES[mode]]
    cfg = SFTConfig.from_toml(None, [
        f"--model.name={args.model}", f"--data.seq_len={args.seq_len}", f"--data.tokenizer={data / 'tok.model'}",
        f"--sft.files={data / 'prefs.jsonl'}", f"--train.steps={args.steps}", "--train.global_batch_size=4",
        "--train.micro_batch_size=4", "--train.eval_every=0", "--checkpoint.every=0", "--logging.wandb=false",
        "--optim.warmup_steps=1", f"--run.dir={args.work / mode}", *extra])
    engines = []

    def engine_factory(**kwargs):
        engines.append(default_engine(**kwargs))
        return engines[-1]

    result, _ = run_sft(cfg, engine_factory=engine_factory, print_fn=lambda *a, **k: None)
    assert result.reason == "completed", result.reason
    engine = engines[0]
    opt = engine.base_optimizer
    module = engine.trained_module

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    trainable = [p for p in module.parameters() if p.requires_grad]
    adapters = sum(p.numel() for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    return {
        "mode": mode, "lora_rank": args.rank if mode != "full" else 0,
        "total_params": sum(p.numel() for p in module.parameters()),
        "trainable_params": sum(p.numel() for p in trainable), "adapter_params": adapters,
        "frozen_bytes": sum(nbytes(p) for p in frozen), "trainable_bytes": sum(nbytes(p) for p in trainable),
        "adam_state_bytes": sum(nbytes(t) for t in state), "adam_state_tensors": len(state),
        "optimizer_param_bytes": sum(nbytes(p) for g in opt.param_groups for p in g["params"]),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "optimizer": type(opt).__name__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    make_data(args.work / "data")
    start, loads, rows = time.perf_counter(), [os.getloadavg()[0]], []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--rank", str(args.rank),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--work", str(args.work)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        loads.append(os.getloadavg()[0])
        r = rows[-1]
        print(f"{mode:10s} trainable {r['trainable_params']:>10,d}  Adam state {r['adam_state_bytes'] / 2**20:8.2f} MiB  "
              f"frozen base {r['frozen_bytes'] / 2**20:7.2f} MiB  peak RSS {r['peak_rss_mib']:7.1f} MiB", flush=True)
    by = {r["mode"]: r for r in rows}
    checks = {}
    for mode, r in by.items():  # Adam keeps two fp32 moments per trained parameter, nothing for the frozen base
        checks[mode] = {"adam_state_is_2x4B_per_trainable": r["adam_state_bytes"] == 8 * r["trainable_params"],
                        "trainable_is_adapters": mode == "full" or r["trainable_params"] == r["adapter_params"]}
    ratios = {}
    if "full" in by:
        for mode in by:
            if mode != "full":
                ratios[mode] = {"adam_state": by[mode]["adam_state_bytes"] / by["full"]["adam_state_bytes"],
                                "peak_rss_saved_mib": round(by["full"]["peak_rss_mib"] - by[mode]["peak_rss_mib"], 1)}
    result = {"benchmark": "bench_lora_memory", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread, fp32, no GPU",
              "load_average_1min": {"start": loads[0], "max": max(loads), "end": loads[-1]},
              "model": args.model, "seq_len": args.seq_len, "steps": args.steps, "micro_batch": 4,
              "lora_targets": TARGETS, "runs": rows, "checks": checks, "ratios_vs_full": ratios,
              "total_s": round(time.perf_counter() - start, 1)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"checks": checks, "ratios_vs_full": ratios}))
    return 0 if all(all(c.values()) for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
