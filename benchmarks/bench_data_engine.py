"""Benchmark: the datatrove prepare engine against today's local engine, same input, same run.

    python benchmarks/bench_data_engine.py [--scales 1,4] [--repeats 2] [--no-slurm] [--output benchmarks/results/bench_data_engine.json]

Input: the real Common Crawl, C4 and Wikipedia samples (``$LLAMA_DATA_DIR``) at scale 1, and at scale 4 the
same files plus three rewritten copies in which every 7th word is replaced by another word of the corpus (so
exact and near dedup do not collapse them: the 4x input is 4x the work). Tokenizer: Llama 2 SentencePiece.
Default cleaning (normalise, exact, near and line dedup, heuristics, language id). One run of each:
  local      ``prepare --engine local --workers 2`` (one process cleans, 2 processes tokenize)
  datatrove  ``prepare --engine datatrove --executor local --tasks 2 --workers 2``
  slurm      ``--executor slurm --tasks 2 --workers 2`` on a one-node slurm-wlm started here (root only), scale 1
Reported: wall time and documents read per second (goal: datatrove >= 0.8x local), whether the outputs are
byte-identical (shards, provenance, report), the peak private memory of each datatrove stage's largest task
at each scale (goal: flat as the input grows 4x), and the local engine's peak RSS (``/usr/bin/time``). The load
average is recorded: the machine is shared. Each scale runs ``--repeats`` pairs, the engines' order alternating
(local first, then datatrove first, ...) so that a load change during a pair does not favour one engine; each
pair's ratio, their median, each run's CPU seconds (user + system of the whole process tree) and the
datatrove stages' per-task wall and CPU seconds (the profile) are in the JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _data_dir() -> Path:
    return Path(os.environ.get("LLAMA_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def _rewrite(text: str, rng: random.Random, vocab: list[str]) -> str:
    words = text.split(" ")
    for i in range(rng.randrange(7), len(words), 7):
        if words[i].isalpha():
            words[i] = rng.choice(vocab)
    return " ".join(words)


def make_input(root: Path, scale: int) -> list[str]:
    """``--source`` arguments for ``scale`` x the real samples (copies 2.. rewritten, see the module doc)."""
    d = _data_dir()
    originals = {"cc": sorted((d / "commoncrawl").glob("*.gz")), "c4": [d / "c4" / "c4-sample.00000-of-00001.json.gz"]}
    wiki = d / "wikipedia" / "wikitext-2-raw.test.txt"
    if scale == 1:
        return ["--source", f"cc={d / 'commoncrawl'}", "--source", f"c4={d / 'c4'}", "--source", f"wiki={wiki}:wikitext"]
    vocab = sorted({w for w in wiki.read_text(encoding="utf-8").split() if w.isalpha() and len(w) > 3})
    rng = random.Random(scale)
    for name, files in originals.items():
        (root / name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / name / f.name)
            with gzip.open(f, "rt", encoding="utf-8") as src:
                recs = [json.loads(line) for line in src if line.strip()]
            for k in range(1, scale):
                with gzip.open(root / name / f"copy{k}-{f.name}", "wt", encoding="utf-8") as dst:
                    for r in recs:
                        for key in ("text", "raw_content"):
                            if isinstance(r.get(key), str):
                                r = {**r, key: _rewrite(r[key], rng, vocab)}
                        dst.write(json.dumps(r) + "\n")
    (root / "wiki").mkdir()
    lines = wiki.read_text(encoding="utf-8").splitlines()
    with open(root / "wiki" / "wiki.txt", "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
        for _ in range(1, scale):
            out.write("\n".join(ln if ln.strip().startswith("=") else _rewrite(ln, rng, vocab) for ln in lines) + "\n")
    return ["--source", f"cc={root / 'cc'}", "--source", f"c4={root / 'c4'}", "--source", f"wiki={root / 'wiki'}:wikitext"]


def run_prepare(args: list[str], out: Path, env: dict[str, str] | None = None) -> dict:
    mem = out.parent / f"{out.name}.maxrss"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(mem)] if Path("/usr/bin/time").exists() else []
    cmd += [sys.executable, "-m", "data_pipeline", "prepare", *args, "--output", str(out)]
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    ru0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                         "HF_HUB_OFFLINE": "1", **(env or {})})
    wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    docs = sum(report["documents_read"].values())
    rss = int(mem.read_text().split()[-1]) * 1024 if mem.exists() else None
    res = {"wall_s": round(wall, 2), "cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
           "load_avg_1min_before": round(load, 2), "documents_read": docs, "docs_per_s": round(docs / wall, 1),
           "documents_kept": json.loads((out / "manifest.json").read_text())["totals"]["documents"],
           "peak_rss_bytes_main_process": rss}
    if "engine" in report:
        stages = report["engine"]["stages"].items()
        res["max_private_bytes_per_task"] = {k: v["max_private_bytes_per_task"] for k, v in stages
                                             if v["max_private_bytes_per_task"] is not None}
        res["task_wall_s"] = {k: v.get("task_wall_s") for k, v in stages if v.get("task_wall_s")}
        res["task_cpu_s"] = {k: v.get("task_cpu_s") for k, v in stages if v.get("task_cpu_s")}
    return res


def same_output(a: Path, b: Path) -> bool:
    names = [p.name for p in a.iterdir() if p.suffix in (".bin", ".idx") or p.name.endswith(".docs.jsonl")]
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    return bool(names) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names) and \
        ra["cleaning"]["by_source"] == rb["cleaning"]["by_source"] and ra["read_issues"] == rb["read_issues"]


def run_slurm(args: list[str], out: Path) -> dict | None:
    from tests.e2e.slurm_cluster import SlurmCluster, SlurmUnavailable

    try:
        cluster = SlurmCluster.start()
    except SlurmUnavailable as e:
        return {"skipped": str(e)}
    try:
        res = run_prepare([*args, "--engine", "datatrove", "--executor", "slurm", "--partition", "debug",
                           "--tasks", "2"], out, env={"SLURM_CONF": cluster.env["SLURM_CONF"]})
        return res
    finally:
        cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="1,4")
    p.add_argument("--no-slurm", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="local/datatrove pairs per scale, order alternating")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_data_engine.json"))
    a = p.parse_args()
    tok = _data_dir() / "tokenizers" / "llama2" / "tokenizer.model"
    result = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpus": os.cpu_count(),
              "load_avg_start": os.getloadavg(), "tokenizer": str(tok), "repeats": a.repeats, "scales": {}}
    with tempfile.TemporaryDirectory(prefix="bench_data_engine_") as tmp:
        for scale in (int(s) for s in a.scales.split(",")):
            root = Path(tmp) / f"x{scale}"
            args = [*make_input(root / "input", scale), "--tokenizer", str(tok), "--workers", "2"]
            runs = {"local": [], "datatrove": []}
            identical = True
            for i in range(a.repeats):
                order = ("local", "datatrove") if i % 2 == 0 else ("datatrove", "local")
                for engine in order:
                    extra = ["--engine", "datatrove", "--tasks", "2"] if engine == "datatrove" else []
                    runs[engine].append(run_prepare([*args, *extra], root / engine))
                identical &= same_output(root / "local", root / "datatrove")
            ratios = [round(d["docs_per_s"] / loc["docs_per_s"], 3) for loc, d in zip(runs["local"], runs["datatrove"])]
            r = {"local_runs": runs["local"], "datatrove_runs": runs["datatrove"],
                 "datatrove_over_local_docs_per_s_per_pair": ratios,
                 "datatrove_over_local_docs_per_s": statistics.median(ratios),
                 "datatrove_over_local_cpu_s_per_pair": [round(d["cpu_s"] / loc["cpu_s"], 3)
                                                          for loc, d in zip(runs["local"], runs["datatrove"])],
                 "identical_output": identical,
                 # memory: the largest figure over the repeats (they differ only by sampling)
                 "datatrove_max_private_bytes_per_task": {k: max(d["max_private_bytes_per_task"][k] for d in runs["datatrove"])
                                                          for k in runs["datatrove"][0]["max_private_bytes_per_task"]},
                 "local_peak_rss_bytes_main_process": max(x["peak_rss_bytes_main_process"] or 0 for x in runs["local"])}
            if scale == 1 and not a.no_slurm:
                r["slurm"] = run_slurm(args, root / "slurm")
                if r["slurm"] and "skipped" not in r["slurm"]:
                    r["slurm"]["identical_to_datatrove_local"] = same_output(root / "datatrove", root / "slurm")
            result["scales"][f"x{scale}"] = r
            print(json.dumps({f"x{scale}": {k: v for k, v in r.items() if not k.endswith("_runs")}}, indent=1), flush=True)
    scales = list(result["scales"].values())
    if len(scales) >= 2:
        small, big = scales[0]["datatrove_max_private_bytes_per_task"], scales[-1]["datatrove_max_private_bytes_per_task"]
        result["datatrove_task_memory_growth_largest_over_smallest_scale"] = {
            k: round(big[k] / v, 3) for k, v in small.items() if k in big}
        result["local_engine_peak_rss_growth"] = round(scales[-1]["local_peak_rss_bytes_main_process"] /
                                                       scales[0]["local_peak_rss_bytes_main_process"], 3)
    result["load_avg_end"] = os.getloadavg()
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.output}")
    return 0 if all(s["identical_output"] for s in scales) else 1


if __name__ == "__main__":
    sys.exit(main())
