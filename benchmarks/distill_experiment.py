"""Experiment: a tiny teacher distilled into a smaller student vs the same student on hard labels alone.

    python benchmarks/distill_experiment.py --work runs/distill_experiment [--seeds 0,1,2 --steps 150] \\
        [--output benchmarks/results/distill_experiment.json]

Teacher: stories260K (a real trained tiny Llama from llama2.c, ../shared/data/checkpoints/stories260K: dim 64,
5 layers, vocab 512). Its training set (TinyStories) is not available offline, so the corpus is the teacher's own
distribution: stories sampled from it at temperature 1 from BOS (a fixed seed for the training stories, another
for the held-out ones), written as JSONL and tokenized with its tok512 tokenizer by ``python -m data_pipeline
prepare`` (the real pretraining shards). Every student sees exactly these shards.

Student: ``debug_tiny`` with ``--student-layers`` layers (dim 64, 4 heads; 2 layers = ~0.16M parameters against
the teacher's 0.26M), a seeded random init. Runs, each for the same steps, batch, LR schedule and ``train.seed``
(init and data order) through ``rlhf.distill``'s real training path (``run_distill`` with the one-process
reference engine):

    hard        hard_label_weight = 1.0 (the ordinary next-token loss; no distillation term)
    fkl_full    forward KL on the full vocabulary (top_k = 0), 50/50 with the hard labels, T = 1
    fkl_top32   forward KL on the teacher's top-32 (renormalised), 50/50 with the hard labels, T = 1

Each trained student is then scored on the same held-out stories (never trained on) by ``evaluate_distill``:
mean next-token cross entropy (nats/token) of the student and of the teacher, full-vocabulary KL(teacher ||
student) and argmax agreement. Seeds are repeated; the JSON holds every run and mean / sample std per method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {
    "hard": ["--distill.hard_label_weight=1.0"],
    "fkl_full": ["--distill.hard_label_weight=0.5", "--distill.top_k=0"],
    "fkl_top32": ["--distill.hard_label_weight=0.5", "--distill.top_k=32"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "distill_experiment")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "distill_experiment.json")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("LLAMA_DATA_DIR", ROOT.parent / "shared" / "data")))
    p.add_argument("--seeds", default="0,1,2", help="train.seed of each repetition (comma list)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--train-stories", type=int, default=256)
    p.add_argument("--heldout-stories", type=int, default=48)
    p.add_argument("--methods", default=",".join(METHODS))
    return p.parse_args()


def sample_stories(teacher, tok, *, n: int, seed: int, batch: int = 128, max_new: int = 255) -> list[str]:
    """``n`` stories sampled from the teacher at temperature 1 from BOS, each ending at BOS/EOS or ``max_new``."""
    from model.generate import generate

    stories = []
    for i in range(0, n, batch):
        rows = min(batch, n - i)
        out = generate(teacher, [[tok.bos_id]] * rows, max_new_tokens=max_new, temperature=1.0,
                       stop_ids=[tok.bos_id, tok.eos_id], row_seeds=[seed * 1_000_003 + i + r for r in range(rows)])
        stories += [tok.decode(ids) for ids in out]
    return stories


def heldout_rows(tok, stories: list[str], *, seq_len: int) -> list[dict]:
    """The held-out stories packed like the training shards (BOS story EOS ...), cut into ``seq_len`` windows."""
    import torch

    from data_pipeline.loader import document_ids

    stream: list[int] = []
    for text in stories:
        stream += tok.encode(text) + [tok.eos_id]
    rows = []
    for start in range(0, len(stream) - seq_len - 1, seq_len):
        window = torch.tensor(stream[start : start + seq_len + 1])
        inputs = window[:-1]
        rows.append({"input_ids": inputs, "labels": window[1:], "loss_mask": torch.ones(seq_len),
                     "document_ids": document_ids(inputs, tok.eos_id)})
    return rows


def prepare_corpus(args: argparse.Namespace, stories_dir: Path) -> tuple[Path, list[dict], dict]:
    import torch

    from model.checkpoints import from_pretrained
    from model.tokenizer import load_tokenizer

    tok_path = stories_dir / "tok512.model"
    tok = load_tokenizer(tok_path)
    teacher = from_pretrained(stories_dir / "stories260K.bin")
    t0 = time.perf_counter()
    with torch.no_grad():
        train = sample_stories(teacher, tok, n=args.train_stories, seed=1)
        heldout = sample_stories(teacher, tok, n=args.heldout_stories, seed=2)
    sample_s = time.perf_counter() - t0
    jsonl = args.work / "stories_train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in train))
    shards = args.work / "shards"
    shutil.rmtree(shards, ignore_errors=True)  # always the stories just sampled
    subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--source", f"stories={jsonl}:jsonl",
                        "--tokenizer", str(tok_path), "--output", str(shards), "--no-clean", "--workers", "1",
                    "--keep-langs", ""], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = heldout_rows(tok, heldout, seq_len=args.seq_len)
    corpus = {"train_stories": len(train), "train_tokens": sum(len(tok.encode(s)) + 1 for s in train),
              "heldout_stories": len(heldout), "heldout_tokens": len(rows) * args.seq_len,
              "sampling_s": round(sample_s, 1), "example_story": train[0][:300]}
    return shards, rows, corpus


def run_one(args: argparse.Namespace, *, shards: Path, teacher: Path, tokenizer: Path, method: str, seed: int,
            rows: list[dict]) -> dict:
    from model.checkpoints import from_pretrained
    from rlhf.distill.config import DistillConfig
    from rlhf.distill.train import evaluate_distill, run_distill
    from train.reference import ReferenceEngine, single_process_topology

    run_dir = args.work / f"{method}_seed{seed}"
    cli = ["--model.name=debug_tiny", f"--model.overrides.n_layers={args.student_layers}",
           f"--data.path={shards}", f"--data.tokenizer={tokenizer}", f"--data.seq_len={args.seq_len}",
           f"--distill.teacher={teacher}", "--distill.temperature=1.0", f"--train.steps={args.steps}",
           f"--train.global_batch_size={args.batch}", f"--train.micro_batch_size={args.batch}",
           f"--train.seed={seed}", "--train.eval_every=0", "--train.log_every=50", "--checkpoint.every=0",
           "--logging.wandb=false", f"--optim.lr={args.lr}", "--optim.warmup_steps=15", f"--run.dir={run_dir}",
           *METHODS[method]]
    cfg = DistillConfig.from_toml(None, cli)
    t0 = time.perf_counter()
    run_distill(cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology,
                print_fn=lambda *a, **k: None)
    train_s = time.perf_counter() - t0
    student = from_pretrained(run_dir / "final_model")
    evaluation = evaluate_distill(student, from_pretrained(teacher), rows, section=cfg.distill)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r["loss"] for r in records if r.get("type", "train") == "train"][-1]
    return {"method": method, "seed": seed, "train_s": round(train_s, 1), "final_train_loss": last,
            "student_params": sum(p.numel() for p in student.parameters()), **evaluation}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row = {"seeds": [r["seed"] for r in mine]}
        for key in ("student_loss", "kl", "argmax_agreement"):
            values = [r[key] for r in mine]
            row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "min": min(values), "max": max(values), "values": values}
        out[method] = row
    if "hard" in out:  # per seed: distilled minus hard-label held-out loss (negative = distillation helps)
        hard = {r["seed"]: r["student_loss"] for r in runs if r["method"] == "hard"}
        for method in out:
            if method != "hard":
                deltas = [r["student_loss"] - hard[r["seed"]] for r in runs if r["method"] == method]
                out[method]["delta_vs_hard"] = {"mean": statistics.fmean(deltas), "values": deltas,
                                                "all_lower": all(d < 0 for d in deltas)}
    return out


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: one thread is the stable measure
    stories_dir = args.data / "checkpoints" / "stories260K"
    if not (stories_dir / "stories260K.bin").is_file():
        print(f"stories260K not found under {stories_dir} (set LLAMA_DATA_DIR)", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    shards, rows, corpus = prepare_corpus(args, stories_dir)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            runs.append(run_one(args, shards=shards, teacher=stories_dir / "stories260K.bin",
                                tokenizer=stories_dir / "tok512.model", method=method, seed=seed, rows=rows))
            loads.append(os.getloadavg()[0])
            print(f"[distill_experiment] {method} seed {seed}: held-out loss {runs[-1]['student_loss']:.4f} "
                  f"(teacher {runs[-1]['teacher_loss']:.4f}), KL {runs[-1]['kl']:.4f}, "
                  f"agreement {runs[-1]['argmax_agreement']:.3f}, {runs[-1]['train_s']} s", flush=True)
    result = {
        "experiment": "distill_experiment", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread, fp32, no GPU",
        "load_average_1min": {"start": loads[0], "max": max(loads), "end": loads[-1]},
        "teacher": "stories260K (llama2.c, dim 64, 5 layers, 0.26M params)",
        "student": f"debug_tiny, {args.student_layers} layers, dim 64, seeded random init",
        "settings": {"steps": args.steps, "batch_sequences": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                     "warmup_steps": 15, "schedule": "cosine to 10%", "temperature": 1.0,
                     "methods": {m: METHODS[m] for m in args.methods.split(",")}},
        "corpus": corpus, "teacher_heldout_loss": runs[0]["teacher_loss"], "summary": summarise(runs),
        "runs": runs, "total_s": round(time.perf_counter() - start, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for method, row in result["summary"].items():
        print(f"{method:10s} held-out loss {row['student_loss']['mean']:.4f} +- {row['student_loss']['std']:.4f} "
              f"{row.get('delta_vs_hard', '')}")
    print(f"teacher {result['teacher_heldout_loss']:.4f}; total {result['total_s']} s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
