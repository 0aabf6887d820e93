"""Command line: prepare shards, inspect them, preview a blend.

    python -m data_pipeline prepare --source cc=../shared/data/commoncrawl --source c4=../shared/data/c4 \\
        --source wiki=../shared/data/wikipedia/wikitext-2-raw.test.txt:wikitext \\
        --tokenizer ../shared/data/tokenizers/llama2/tokenizer.model --output runs/data --workers 2
    python -m data_pipeline prepare --engine datatrove --executor local|slurm|ray --tasks 64 --workers 16 \\
        [--partition cpu] --source ... --tokenizer ... --output /shared/runs/data     # same output, distributed
    python -m data_pipeline inspect runs/data [--source c4 --doc 3] [--json]
    python -m data_pipeline blend runs/data --weights cc=0.67,c4=0.15,wiki=0.18 --seq-len 2048 \\
        --samples 10000 [--budget-tokens 1.4e12]

``prepare`` resumes an interrupted run in the same ``--output`` (same arguments): at shard granularity with
``--engine local``, at task granularity with ``--engine datatrove`` (``data_pipeline/dt/``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.blend import MixtureSpec, epochs_report, format_epochs_table, parse_weights, read_manifest
from data_pipeline.cleaning import CleaningConfig, normalize_text
from data_pipeline.readers import SourceSpec, issue_summary, read_text_of


def _prepare(a: argparse.Namespace) -> int:
    from data_pipeline.tokenize_shards import PrepareConfig, prepare

    if a.no_clean:
        cleaning = CleaningConfig.disabled()
    else:
        cleaning = CleaningConfig(
            near_dup_threshold=a.near_dup_threshold, min_words=a.min_words,
            keep_langs=tuple(x for x in a.keep_langs.split(",") if x), langid=bool(a.keep_langs),
            line_dedup_sources=tuple(a.line_dedup_sources.split(",")) if a.line_dedup_sources else None)
    cfg = PrepareConfig(sources=[SourceSpec.parse(s) for s in a.source], tokenizer=a.tokenizer,
                        output=Path(a.output), workers=a.workers, shard_docs=a.shard_docs,
                        shard_bytes=a.shard_mb << 20, cleaning=cleaning, keep_shards=a.keep_shards)
    if a.engine == "datatrove":
        from data_pipeline.dt.engine import DatatroveConfig, prepare_datatrove

        m = prepare_datatrove(cfg, DatatroveConfig(executor=a.executor, tasks=a.tasks, workers=a.workers,
                                                   partition=a.partition, time=a.slurm_time, wait=not a.no_wait))
        if m is None:
            print(f"submitted; rerun the same command with --wait (or look for {Path(a.output) / 'manifest.json'})")
            return 0
    else:
        m = prepare(cfg)
    for name, s in m["sources"].items():
        print(f"{name:<12} read {s['documents_read']:>9,} kept {s['documents']:>9,} docs "
              f"{s['tokens']:>14,} tokens  {s['shards']} shards")
    report_path = Path(a.output) / "report.json"
    print("\n".join(issue_summary(json.loads(report_path.read_text())["read_issues"], report_path)))
    print(f"manifest: {Path(a.output) / 'manifest.json'}   report: {report_path}")
    return 0


def inspect_dir(data_dir: str | Path, *, source: str | None = None, doc: int = 0,
                tokenizer: str | None = None) -> dict[str, Any]:
    """Counts, integrity, one decoded document (and whether it equals its normalised source text), report."""
    from data_pipeline.shard_io import mcore_datasets, validate_indexed
    from data_pipeline.tokenize_shards import load_pipeline_tokenizer

    d = Path(data_dir)
    m = read_manifest(d)
    counts = {}
    for name, s in m["sources"].items():
        if s.get("prefix"):
            validate_indexed(d / s["prefix"], expect_docs=s["documents"], expect_tokens=s["tokens"])
        counts[name] = {k: s[k] for k in ("documents_read", "documents", "tokens", "text_bytes", "bin_bytes")}
    name = source or next(n for n, s in m["sources"].items() if s.get("prefix"))
    prefix = d / m["sources"][name]["prefix"]
    ds = mcore_datasets().IndexedDataset(str(prefix))
    ids = ds[doc]
    tok = load_pipeline_tokenizer(tokenizer or m["tokenizer"]["path"])
    eos = m["tokenizer"]["eos_id"]
    body = ids[:-1] if len(ids) and ids[-1] == eos else ids
    text = tok.decode([int(i) for i in body])
    with open(f"{prefix}.docs.jsonl", encoding="utf-8") as f:
        meta = json.loads(next(line for i, line in enumerate(f) if i == doc))
    fmt = next((s["format"] for s in m["identity"]["sources"] if s["name"] == name), None)
    raw = read_text_of(meta["file"], meta["line"], fmt)
    report = json.loads((d / "report.json").read_text())
    return {"counts": counts, "tokenizer": m["tokenizer"], "dtype": m["dtype"],
            "sample": {"source": name, "doc": doc, **meta, "decoded": text, "ends_with_eos": int(ids[-1]) == eos,
                       "equals_source_text": raw is not None and normalize_text(raw) == text},
            "report": report}


def _summary(report: dict[str, Any]) -> list[str]:
    lines = []
    for src, filters in report["cleaning"]["by_source"].items():
        for fname, st in filters.items():
            reasons = ", ".join(f"{k}={v}" for k, v in Counter(st["reasons"]).most_common(4))
            lines.append(f"  {src:<10} {fname:<12} in {st['docs_in']:>7} kept {st['docs_kept']:>7} "
                         f"dropped {st['docs_dropped']:>6} ({st['bytes_dropped']:,} B) modified {st['docs_modified']:>5}"
                         + (f"  [{reasons}]" if reasons else ""))
    issues = report["read_issues"]
    lines.append(f"  read issues: {issues['counts'] or 'none'}")
    for i in issues["issues"][:10]:
        lines.append(f"    {i['file']}:{i['line']}: {i['kind']}: {i['detail']}")
    return lines


def _inspect(a: argparse.Namespace) -> int:
    info = inspect_dir(a.dir, source=a.source, doc=a.doc, tokenizer=a.tokenizer)
    if a.json:
        print(json.dumps(info, indent=1, ensure_ascii=False))
        return 0
    print(f"tokenizer: {info['tokenizer']['path']} (vocab {info['tokenizer']['vocab_size']}, dtype {info['dtype']})")
    for name, c in info["counts"].items():
        print(f"{name:<12} read {c['documents_read']:>9,} kept {c['documents']:>9,} tokens {c['tokens']:>14,}")
    s = info["sample"]
    print(f"\nsample: {s['source']} doc {s['doc']} id={s['id']} ({s['file']}:{s['line']}, {s['tokens']} tokens, "
          f"equals source text: {s['equals_source_text']})")
    print(s["decoded"][: a.chars] + ("..." if len(s["decoded"]) > a.chars else ""))
    print("\nreport:")
    print("\n".join(_summary(info["report"])))
    return 0


def _blend(a: argparse.Namespace) -> int:
    from data_pipeline.loader import build_pretrain_datasets

    spec = MixtureSpec.from_weights(a.dir, parse_weights(a.weights) if a.weights else None)
    m = read_manifest(a.dir)
    tok = {"vocab_size": m["tokenizer"]["vocab_size"], "eod": m["tokenizer"]["eos_id"]}
    train, _, _ = build_pretrain_datasets(data_dir_or_blend=spec, seq_len=a.seq_len, seed=a.seed, split=a.split,
                                          num_samples=(a.samples, 0, 0), tokenizer_info=tok, cache_dir=None)
    names = [e.name for e in spec.entries]
    if hasattr(train, "dataset_index"):
        frac = np.bincount(np.asarray(train.dataset_index[: a.samples]), minlength=len(names)) / a.samples
    else:
        frac = np.ones(1)
    for n, w, f in zip(names, spec.normalized().values(), frac):
        print(f"{n:<12} weight {w:6.1%}  sampled {f:6.2%}")
    budget = a.budget_tokens or a.samples * a.seq_len
    print(f"\nepochs for a budget of {budget:,.0f} tokens:")
    print(format_epochs_table(epochs_report(spec, budget)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="raw files -> cleaned -> tokenized .bin/.idx + manifest")
    pp.add_argument("--source", action="append", required=True, help="NAME=PATH[:FORMAT] (repeat)")
    pp.add_argument("--tokenizer", required=True)
    pp.add_argument("--output", required=True)
    pp.add_argument("--engine", choices=("local", "datatrove"), default="local",
                    help="local: this process + tokenizer workers; datatrove: distributed stages (--executor)")
    pp.add_argument("--executor", choices=("local", "slurm", "ray"), default="local", help="datatrove engine only")
    pp.add_argument("--tasks", type=int, default=2, help="datatrove: tasks per pass (input slices)")
    pp.add_argument("--partition", help="datatrove + slurm: the SLURM partition")
    pp.add_argument("--slurm-time", default="24:00:00", help="datatrove + slurm: time limit per array task")
    pp.add_argument("--no-wait", action="store_true", help="datatrove + slurm: return once the jobs are submitted")
    pp.add_argument("--workers", type=int, default=2, help="local: tokenizer processes; datatrove: tasks at once")
    pp.add_argument("--shard-docs", type=int, default=20_000)
    pp.add_argument("--shard-mb", type=int, default=128)
    pp.add_argument("--near-dup-threshold", type=float, default=0.7)
    pp.add_argument("--min-words", type=int, default=20)
    pp.add_argument("--keep-langs", default="en", help="comma list; empty disables language id")
    pp.add_argument("--line-dedup-sources", default="", help="comma list of sources to line-dedup (default all)")
    pp.add_argument("--no-clean", action="store_true", help="tokenize as read (no normalisation or filters)")
    pp.add_argument("--keep-shards", action="store_true")
    pi = sub.add_parser("inspect", help="counts, a decoded sample, the report")
    pi.add_argument("dir")
    pi.add_argument("--source")
    pi.add_argument("--doc", type=int, default=0)
    pi.add_argument("--tokenizer")
    pi.add_argument("--chars", type=int, default=600)
    pi.add_argument("--json", action="store_true")
    pb = sub.add_parser("blend", help="build a weighted blend and print sampled fractions and epochs")
    pb.add_argument("dir")
    pb.add_argument("--weights", default="")
    pb.add_argument("--seq-len", type=int, default=2048)
    pb.add_argument("--samples", type=int, default=10_000)
    pb.add_argument("--split", default="98,1,1")
    pb.add_argument("--seed", type=int, default=1234)
    pb.add_argument("--budget-tokens", type=float, default=None)
    a = p.parse_args(argv)
    try:
        return {"prepare": _prepare, "inspect": _inspect, "blend": _blend}[a.cmd](a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
