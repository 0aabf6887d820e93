"""Benchmark: MFU of the full training stack on one GPU (issue "3D parallelism", performance), JSON out.

    python benchmarks/bench_gpu_mfu.py [--output benchmarks/results/bench_gpu_mfu.json]      # on a CUDA machine
    python benchmarks/bench_gpu_mfu.py --model debug_tiny --seq-len 128 --steps 4 --warmup 1 --dtype fp32 \\
        --output /tmp/smoke.json                                                               # the CPU smoke run

    python benchmarks/bench_gpu_mfu.py --document-mask off                                     # plain causal

What runs: ``python -m train`` itself (the loop, the DeepSpeed engine, ZeRO-1, one process) on the Llama 3-style
``bench_1p5b`` (1.50B parameters: dim 2048, 16 layers, 32 heads / 8 kv heads, FFN 8192, vocab 128256, the
shape of Llama 3.2 1B with an untied head), sequence 4096, bf16 with fp32 master weights, synthetic tokens (no
data loading cost to hide) packed from documents of 512-1536 tokens (``--document-length``: the synthetic
default of 4-47 tokens would let the document mask skip nearly all attention work that the model FLOPs still
count), the document mask on (the default users train with; ``--document-mask off`` for plain causal attention), ``--steps`` optimizer steps of ``--micro-batch`` x ``--grad-accum`` sequences.
The numbers are the loop's own ``metrics.jsonl`` records (so the benchmark measures what users see), medians
over the steps after ``--warmup``.

MFU = model FLOP/s per device / peak: model FLOPs per token from ``model.config.model_flops_per_token``
(``6 x (non-embedding params + head) + 6 x n_layers x dim x seq``: the causal half of attention's square,
embedding lookups excluded, recomputation not counted; with the document mask on, this convention (torchtitan's)
still counts the causal attention of the whole sequence, which the kernel partly skips: for ``bench_1p5b`` at
4096 attention is ~9% of the FLOPs, so the masked MFU may read up to that much high), peak = the GPU's dense BF16 datasheet figure from
``train/devices.py`` matched on its reported name (989.4 TFLOP/s on H100/H200 SXM; the JSON states it). Goal: >= 50% (Megatron reports 47% at scale,
torchtitan 33-39% for 8B without float8). On CPU the loop's peak is the measured fp32 matmul peak, and the
run is only a check that the script works (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.50


def train_argv(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``python -m train`` command line of the measurement."""
    return [sys.executable, "-m", "train", "--config", "configs/pretrain/tiny_cpu.toml",
            f"--model.name={args.model}", "--data.synthetic=true", f"--data.seq_len={args.seq_len}",
            f"--data.document_mask={str(args.document_mask == 'on').lower()}",
            f"--data.synthetic_document_length={args.document_length}", f"--train.steps={args.steps}",
            f"--train.micro_batch_size={args.micro_batch}",
            f"--train.global_batch_size={args.micro_batch * args.grad_accum}", f"--train.dtype={args.dtype}",
            "--train.eval_every=0", "--train.log_every=1", "--zero.stage=1", "--optim.lr=3e-4",
            f"--parallel.activation_checkpoint_every={args.activation_checkpoint_every}",
            "--checkpoint.every=0", "--logging.wandb=false", f"--run.dir={run_dir}"]


def summarise(records: list[dict], *, warmup: int) -> dict[str, float]:
    """Medians of the loop's per-step records after the warm-up steps."""
    steps = [r for r in records if r.get("type") == "train" and not r.get("skipped")][warmup:]
    if not steps:
        raise SystemExit(f"no measured steps: {len(records)} records, warmup {warmup}")
    med = {k: statistics.median(float(r[k]) for r in steps)
           for k in ("mfu", "tokens_per_s", "tflops_per_device", "step_time_s", "mem_gb")}
    return {**med, "measured_steps": len(steps), "peak_flops": float(steps[0]["peak_flops"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench_1p5b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--document-mask", default="on", choices=("on", "off"),
                   help="on: Llama 3's document mask, the default users train with; off: plain causal attention")
    p.add_argument("--document-length", type=int, default=1024,
                   help="mean synthetic document length in tokens (lengths uniform in [L/2, 3L/2])")
    p.add_argument("--activation-checkpoint-every", type=int, default=0, help="0: no activation checkpointing")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "bench_gpu_mfu.json")
    args = p.parse_args(argv)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run, not a measurement)"
    with tempfile.TemporaryDirectory(prefix="bench_gpu_mfu_") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = train_argv(args, run_dir)
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise SystemExit(f"python -m train exited {proc.returncode}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"benchmark": "gpu_mfu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device, "torch": torch.__version__, "command": " ".join(cmd[1:]),
              "model": args.model, "seq_len": args.seq_len, "dtype": args.dtype,
              "document_mask": args.document_mask == "on", "mean_document_tokens": args.document_length,
              "tokens_per_step": args.seq_len * args.micro_batch * args.grad_accum,
              **summarise(records, warmup=args.warmup), "goal_mfu": GOAL}
    result["goal_met"] = bool(torch.cuda.is_available() and result["mfu"] >= GOAL)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
