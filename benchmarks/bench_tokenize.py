"""Benchmark: tokenize + write throughput of ``data_pipeline prepare`` against two peers in the same run.

    python benchmarks/bench_tokenize.py [--mb 24] [--workers 2] [--output benchmarks/results/bench_tokenize.json]

Input: the real C4 and Common Crawl samples (``$LLAMA_DATA_DIR``, default ``../shared/data``) repeated into a
temporary JSONL of ``--mb`` MB (never written into the repository). Tokenizer: the Llama 2 SentencePiece model.
Peers, on the same text:
  raw      ``tokenizer.encode`` over every document in this one process, single-threaded (no I/O at all): the
           per-core ceiling. ``>= 1.6x`` with 2 workers means the pipeline's reading, IPC and writing cost little.
  hf       the straightforward baseline: Hugging Face ``datasets`` load_dataset("json") + ``.map`` with the
           same tokenizer (batched, one process), then megatron ``IndexedDatasetBuilder`` over the rows.
  ours     ``prepare`` with ``--workers`` workers, cleaning disabled (this measures tokenize+write).
Memory: ``prepare`` runs in a child process on inputs of 1x and 4x ``--mem-mb``; peak RSS of the main process
and of the largest worker are reported (they should not grow with the input: the pipeline streams).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _data_dir() -> Path:
    return Path(os.environ.get("LLAMA_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def make_input(path: Path, mb: float) -> int:
    import gzip

    d = _data_dir()
    texts = []
    for f in [d / "c4" / "c4-sample.00000-of-00001.json.gz", *sorted((d / "commoncrawl").glob("*.gz"))]:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            texts += [t for line in fh if (t := json.loads(line).get("text"))]
    written, i = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < mb * 1e6:
            t = texts[i % len(texts)]
            out.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
            written += len(t.encode("utf-8"))
            i += 1
    return written


def bench_raw(path: Path, tok_path: Path) -> float:
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    t0 = time.perf_counter()
    for t in texts:
        tok.encode(t)
    return time.perf_counter() - t0


def bench_hf(path: Path, tok_path: Path, tmp: Path) -> float:
    import datasets
    import numpy as np
    import torch

    from data_pipeline.shard_io import mcore_datasets
    from model.tokenizer import load_tokenizer

    mc = mcore_datasets()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tok = load_tokenizer(tok_path)
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp / "hf_cache"))
    ds = ds.map(lambda b: {"ids": [tok.encode(t) + [tok.eos_id] for t in b["text"]]}, batched=True,
                remove_columns=ds.column_names)
    builder = mc.IndexedDatasetBuilder(str(tmp / "hf.bin"), dtype=np.uint16)
    for row in ds:
        builder.add_item(torch.tensor(row["ids"], dtype=torch.int32))
        builder.end_document()
    builder.finalize(str(tmp / "hf.idx"))
    return time.perf_counter() - t0


def bench_ours(path: Path, tok_path: Path, out: Path, workers: int) -> float:
    from data_pipeline.cleaning import CleaningConfig
    from data_pipeline.readers import SourceSpec
    from data_pipeline.shard_io import mcore_datasets
    from data_pipeline.tokenize_shards import PrepareConfig, prepare

    mcore_datasets()  # import cost (~5 s) is paid once per process, not per run: exclude it
    t0 = time.perf_counter()
    prepare(PrepareConfig(sources=[SourceSpec.parse(f"b={path}")], tokenizer=tok_path, output=out, workers=workers,
                          shard_bytes=1 << 20, cleaning=CleaningConfig.disabled(), progress=False))
    return time.perf_counter() - t0


def _child_peak(path: Path, tok_path: Path, out: Path, workers: int) -> dict[str, float]:
    code = (f"import sys, resource; sys.path.insert(0, {str(REPO)!r}); "
            "from benchmarks.bench_tokenize import bench_ours; from pathlib import Path; "
            f"bench_ours(Path({str(path)!r}), Path({str(tok_path)!r}), Path({str(out)!r}), {workers}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    main_kb, child_kb = map(int, res.stdout.split()[-2:])
    return {"main_peak_mb": main_kb / 1024, "worker_peak_mb": child_kb / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=24.0)
    p.add_argument("--mem-mb", type=float, default=6.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default=str(_data_dir() / "tokenizers" / "llama2" / "tokenizer.model"))
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_tokenize.json"))
    a = p.parse_args()
    tok = Path(a.tokenizer)
    if not tok.is_file():
        sys.exit(f"tokenizer not found: {tok} (set LLAMA_DATA_DIR)")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        nbytes = make_input(tmp / "in.jsonl", a.mb)
        t_raw = bench_raw(tmp / "in.jsonl", tok)
        t_ours = bench_ours(tmp / "in.jsonl", tok, tmp / "ours", a.workers)
        t_hf = bench_hf(tmp / "in.jsonl", tok, tmp)
        make_input(tmp / "small.jsonl", a.mem_mb)
        make_input(tmp / "large.jsonl", 4 * a.mem_mb)
        mem_small = _child_peak(tmp / "small.jsonl", tok, tmp / "m1", a.workers)
        mem_large = _child_peak(tmp / "large.jsonl", tok, tmp / "m4", a.workers)
    mbps = lambda t: nbytes / t / 1e6  # noqa: E731
    result = {
        "input_text_mb": nbytes / 1e6, "tokenizer": str(tok), "workers": a.workers, "cpus": os.cpu_count(),
        "seconds": {"raw_encode_1proc": t_raw, "ours": t_ours, "hf_map_plus_builder": t_hf},
        "throughput_mb_per_s": {"raw_encode_1proc": mbps(t_raw), "ours": mbps(t_ours), "hf_map_plus_builder": mbps(t_hf)},
        "ratio_vs_raw_encode": t_raw / t_ours, "ratio_vs_hf_baseline": t_hf / t_ours,
        "targets": {"vs_raw_encode": 1.6, "vs_hf_baseline": 1.3},
        "memory": {f"{a.mem_mb:g}MB": mem_small, f"{4 * a.mem_mb:g}MB": mem_large,
                   "main_growth_4x_input": mem_large["main_peak_mb"] / mem_small["main_peak_mb"],
                   "worker_growth_4x_input": mem_large["worker_peak_mb"] / mem_small["worker_peak_mb"]},
        "peak_rss_this_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
