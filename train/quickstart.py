"""Quickstart: corpus -> tokenizer -> shards -> pretrain a tiny Llama on CPU -> checkpoint, report, samples.

    python -m train.quickstart                          # ~4 min on 2 cores, no network, no data needed
    python -m train.quickstart --data ../shared/data --minutes 12 --run-dir runs/tiny_real   # real samples
    python -m train.quickstart --tiny                   # seconds: the end-to-end test's version

Without ``--data`` the corpus is built from text every Python installation has: the docstrings of the
standard library's modules, classes and functions (``ast`` over ``sysconfig.get_paths()["stdlib"]``, files in
sorted order, tests excluded), a few MB. With ``--data DIR`` it reads the real samples instead:
``DIR/wikipedia/wikitext-2-raw.test.txt`` (WikiText), ``DIR/c4/*.json.gz`` (C4 JSONL) and
``DIR/commoncrawl/CC-MAIN-*.jsonl.gz`` (Dolma JSONL), cleaned by the data pipeline.

Steps, all with the real stack: ``model.tokenizer.train_sentencepiece`` (BPE, the Llama settings; 4096 pieces
on the stdlib corpus, 8192 on the real samples to match ``debug_15m``), ``data_pipeline`` prepare into
``RUN_DIR/data`` (megatron shards + manifest), ``python -m train`` (``train.loop.train``: DeepSpeed engine,
checkpoints, metrics.jsonl) for a time budget (the step count is set from a measured step time), then
``train.report`` and a few sampled lines from the final checkpoint (``model.generate``). It also prints the
held-out loss next to the unigram entropy of the held-out tokens under the training-token unigram model
(the loss of a model that ignores context): a trained model must be well below it.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo",
             "ensurepip", "venv", "config-3", "tkinter"}


def stdlib_documents(*, max_bytes: int) -> Iterator[str]:
    """One document per stdlib module: its docstring, then each class/function docstring with its name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]) or path.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    head = "" if isinstance(node, ast.Module) else f"{node.name}: "
                    parts.append(head + doc.strip())
        if not parts:
            continue
        text = "\n\n".join(parts)
        yield text
        total += len(text.encode())
        if total >= max_bytes:
            return


def _sources(args: argparse.Namespace, run_dir: Path) -> list[str]:
    if args.data:
        d = Path(args.data)
        specs = [f"wiki={d / 'wikipedia' / 'wikitext-2-raw.test.txt'}:wikitext", f"c4={d / 'c4'}:jsonl",
                 f"cc={d / 'commoncrawl' / 'CC-MAIN-*.jsonl.gz'}:jsonl"]
        missing = [s for s in specs if not any(Path(s.split("=", 1)[1].rsplit(":", 1)[0]).parent.glob("*"))]
        if missing:
            raise SystemExit(f"--data {d}: expected wikipedia/, c4/ and commoncrawl/ samples; missing {missing}")
        return specs
    corpus = run_dir / "corpus" / "stdlib_docstrings.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    max_bytes = 400_000 if args.tiny else 3_000_000
    with open(corpus, "w") as fh:
        for text in stdlib_documents(max_bytes=max_bytes):
            fh.write(json.dumps({"text": text}) + "\n")
    return [f"stdlib={corpus}:jsonl"]


def _texts(specs: list[str]) -> Iterator[str]:
    from data_pipeline.readers import IssueLog, SourceSpec, read_source

    issues = IssueLog()
    for spec in specs:
        for doc in read_source(SourceSpec.parse(spec), issues):
            yield from doc.text.splitlines()


def prepare_data(args: argparse.Namespace, run_dir: Path) -> tuple[Path, Path]:
    """Train the tokenizer and tokenize the corpus into RUN_DIR/data; returns (tokenizer, data dir)."""
    from data_pipeline.cleaning import CleaningConfig
    from data_pipeline.readers import SourceSpec
    from data_pipeline.tokenize_shards import PrepareConfig, prepare
    from model.tokenizer import train_sentencepiece

    specs = _sources(args, run_dir)
    t0 = time.perf_counter()
    tok = run_dir / "tokenizer" / f"tok{args.vocab}.model"
    if not tok.is_file():
        train_sentencepiece(texts=_texts(specs), output_prefix=tok.with_suffix(""), vocab_size=args.vocab,
                            character_coverage=0.9995)
    print(f"[quickstart] tokenizer {tok} ({args.vocab} pieces) in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    # Real web text gets the full cleaning (WikiText repeats its headings, so no line dedup there);
    # docstrings are clean already.
    cleaning = (CleaningConfig(line_dedup_sources=("c4", "cc")) if args.data else CleaningConfig.disabled())
    manifest = prepare(PrepareConfig(sources=[SourceSpec.parse(s) for s in specs], tokenizer=tok,
                                     output=run_dir / "data", workers=2, cleaning=cleaning, progress=False))
    counts = ", ".join(f"{n} {s['documents']} docs {s['tokens']:,} tokens" for n, s in manifest["sources"].items())
    print(f"[quickstart] data {run_dir / 'data'}: {counts} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return tok, run_dir / "data"


def _measure_step_seconds(model_cfg: Any, *, micro: int, seq_len: int, accum: int) -> float:
    import torch
    import torch.nn.functional as F

    from model.llama import Llama

    model = Llama(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model_cfg.vocab_size, (micro, seq_len))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return min(times[1:]) * accum * 1.1  # 10% for the stack (engine, data, logging)


def run_config(args: argparse.Namespace, run_dir: Path, tok: Path, data: Path) -> Any:
    from train.config import RunConfig

    if args.tiny:
        over = ["--model.name=debug_tiny", "--data.seq_len=64", "--train.global_batch_size=8",
                "--train.micro_batch_size=4", "--train.eval_every=4", "--train.eval_batches=2",
                "--optim.lr=3e-3", "--optim.warmup_steps=2", "--checkpoint.every=4"]
    else:
        over = []
    over += [f"--run.dir={run_dir}", f"--data.path={data}", f"--data.tokenizer={tok}",
             f"--model.overrides.vocab_size={args.vocab}", "--train.log_every=1" if args.tiny else "--train.log_every=5",
             f"--logging.wandb={'true' if args.wandb else 'false'}", "--run.resume=auto"]
    cfg = RunConfig.from_toml("configs/pretrain/tiny_real_data.toml" if Path("configs").is_dir() else None, over)
    if args.steps:
        steps = args.steps
    else:
        step_s = _measure_step_seconds(cfg.model_config(), micro=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
                                       accum=cfg.grad_accum(1))
        steps = max(10, int(args.minutes * 60 / step_s))
        print(f"[quickstart] measured ~{step_s:.2f} s/step -> {steps} steps for {args.minutes:g} min", flush=True)
    every = max(2, steps // 5)
    return cfg.replace(train={"steps": steps, "eval_every": every}, optim={"warmup_steps": max(2, steps // 20)},
                       checkpoint={"every": every})


def unigram_entropy(data_dir: Path, cfg: Any) -> tuple[float, float]:
    """(entropy of the training-token unigram distribution, cross-entropy of held-out tokens under it), nats.

    Counts come from the training split's token ids, add-one smoothed over the vocabulary; the held-out
    tokens are the validation batches the loop evaluates on (the same ``eval_batches`` micro-batches)."""
    from train.data import build_datasets

    train_ds, valid_ds, _ = build_datasets(cfg, cfg.model_config(), dp_size=1, run_dir=cfg.run_dir)
    vocab = cfg.model_config().vocab_size
    counts = np.ones(vocab)
    for i in range(min(len(train_ds), cfg.train.steps * cfg.train.global_batch_size)):
        counts += np.bincount(np.asarray(train_ds[i]["labels"]), minlength=vocab)[:vocab]
    p = counts / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    held = np.concatenate([np.asarray(valid_ds[i]["labels"])
                           for i in range(cfg.train.eval_batches * cfg.train.micro_batch_size)])
    return entropy, float(-np.log(p[held]).mean())


def logged_losses(metrics: Path) -> tuple[float | None, float]:
    """(last validation loss, last training loss) recorded in a run's ``metrics.jsonl``."""
    val, loss = None, float("nan")
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "validation":
            val = float(rec["val_loss"])
        elif rec.get("type") == "train":
            loss = float(rec["loss"])
    return val, loss


def sample(run_dir: Path, tok_path: Path, *, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    from model import from_pretrained
    from model.generate import generate
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    model = from_pretrained(run_dir / "final_model").eval()
    ids = [tok.encode(p, bos=True) for p in prompts]
    outs = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95,
                    stop_ids=[tok.eos_id], seed=0)
    return [p + tok.decode(o) for p, o in zip(prompts, outs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="shared data dir with wikipedia/ c4/ commoncrawl/ samples")
    parser.add_argument("--run-dir", default="", help="default runs/quickstart (runs/quickstart_real with --data)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training time budget (sets the step count)")
    parser.add_argument("--steps", type=int, default=0, help="exact step count instead of --minutes")
    parser.add_argument("--vocab", type=int, default=0, help="tokenizer size (default 4096; 8192 with --data)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds of everything (tests)")
    parser.add_argument("--wandb", action="store_true", help="also log to wandb (offline unless logged in)")
    args = parser.parse_args(argv)
    args.vocab = args.vocab or (8192 if args.data else (1024 if args.tiny else 4096))
    if args.tiny and not args.steps:
        args.steps = 8
    run_dir = Path(args.run_dir or ("runs/quickstart_real" if args.data else "runs/quickstart"))
    start = time.perf_counter()
    tok, data = prepare_data(args, run_dir)
    cfg = run_config(args, run_dir, tok, data)
    from train.loop import train
    from train.report import write_report

    result = train(cfg)
    val_loss, train_loss = result.last_val_loss, result.last_loss
    if result.last_step == result.start_step:  # run-dir held a finished run: resumed at its end, nothing to train
        print(f"[quickstart] {run_dir} already holds a finished run of {result.last_step} steps (pass --run-dir "
              "DIR for a new one); its logged losses are reported", flush=True)
        val_loss, train_loss = logged_losses(run_dir / "metrics.jsonl")
    report = write_report(run_dir)
    entropy, held_unigram = unigram_entropy(data, cfg)
    print(f"[quickstart] held-out loss {val_loss:.4f} nats/token vs unigram entropy {entropy:.4f} "
          f"(held-out tokens under the unigram model: {held_unigram:.4f}); report {report}/summary.md")
    (run_dir / "quickstart.json").write_text(json.dumps({
        "val_loss": val_loss, "unigram_entropy": entropy, "heldout_unigram_ce": held_unigram,
        "train_loss": train_loss, "steps": result.last_step, "seconds": time.perf_counter() - start}) + "\n")
    prompts = (["The ", "In 2019, "] if args.data else ["Return the ", "This module ", "Raise ValueError if "])
    print("[quickstart] samples from", run_dir / "final_model")
    for text in sample(run_dir, tok, prompts=prompts):
        print("   ", text.replace("\n", " ")[:200])
    ok = val_loss is not None and math.isfinite(val_loss)
    print(f"[quickstart] done in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
