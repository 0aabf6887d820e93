"""The datatrove engine's last stage (one task): merge, check, and write ``report.json`` and ``manifest.json``.

    Finalize(out="runs/data", work="runs/data/dt", keep_shards=False)   # built by data_pipeline.dt.engine

Per source, the (source, task) shards are concatenated in task order (``shard_io.merge_indexed``, streaming)
into ``<source>.bin/.idx/.docs.jsonl`` exactly like the local engine's output, each shard checked against
the counts its writer recorded. The tasks' read counts, malformed-record logs and per-filter ledgers are
merged into ``report.json`` in the local engine's format (plus an ``engine`` section: stages, tasks, peak
memory per task). A source with no usable document fails the run here, naming it, before any manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_pipeline.cleaning import FilterLedger
from data_pipeline.dt.steps import write_json_atomic
from data_pipeline.readers import IssueLog, SourceError, check_sources_readable
from data_pipeline.shard_io import merge_indexed, read_index, validate_indexed
from data_pipeline.tokenize_shards import MANIFEST_VERSION


def _merge_docs_sidecar(prefixes: list[Path], out: Path) -> None:
    """``.docs.jsonl`` lines (id, file, line) + each document's token count from its ``.idx``."""
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as dst:
        for prefix in prefixes:
            lengths = read_index(prefix)["lengths"]
            n = 0
            with open(f"{prefix}.docs.jsonl", encoding="utf-8") as src:
                for n, line in enumerate(src, 1):
                    rec = json.loads(line)
                    rec["tokens"] = int(lengths[n - 1])
                    dst.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if n != len(lengths):
                raise ValueError(f"{prefix}.docs.jsonl: {n} lines for {len(lengths)} documents in {prefix}.idx; "
                                 "the shard is from an interrupted task: rerun the same prepare command")
    os.replace(tmp, out)


def merge_source(work: Path, out: Path, source: str, dtype: str) -> dict[str, Any]:
    shard_dir = work / "shards" / source
    prefixes = sorted(p.with_suffix("") for p in shard_dir.glob("*.idx")) if shard_dir.is_dir() else []
    counts = Counter()
    for prefix in prefixes:
        c = json.loads(Path(f"{prefix}.json").read_text())
        validate_indexed(prefix, expect_docs=c["documents"], expect_tokens=c["tokens"],
                         expect_dtype=np.dtype(dtype).type)
        counts.update(c)
    if not prefixes:
        return {"documents": 0, "tokens": 0, "text_bytes": 0, "shards": 0, "bin_bytes": 0}
    _merge_docs_sidecar(prefixes, out / f"{source}.docs.jsonl")
    merge_indexed(prefixes, out / source)
    validate_indexed(out / source, expect_docs=counts["documents"], expect_tokens=counts["tokens"])
    return {"documents": counts["documents"], "tokens": counts["tokens"], "text_bytes": counts["text_bytes"],
            "shards": len(prefixes), "bin_bytes": (out / f"{source}.bin").stat().st_size}


def engine_section(work: Path) -> dict[str, Any]:
    """Stages in order with their task count, the peak private memory of their tasks, and each task's wall
    and CPU seconds (the profile: a stage whose tasks' wall times differ is unbalanced)."""
    run = json.loads((work / "run.json").read_text()) if (work / "run.json").is_file() else {}
    stages = {}
    for stage in run.get("stages", []):
        mem = [json.loads(p.read_text()) for p in sorted((work / "memory" / stage["name"]).glob("*.json"))]
        stages[stage["name"]] = {"tasks": stage["tasks"],
                                 "max_private_bytes_per_task": max((m["private_bytes_peak"] for m in mem), default=None),
                                 "task_wall_s": [m.get("wall_s") for m in mem], "task_cpu_s": [m.get("cpu_s") for m in mem]}
    return {"name": "datatrove", "executor": run.get("executor"), "tasks": run.get("tasks"), "stages": stages}


class Finalize(PipelineStep):
    name = "merge shards, report.json, manifest.json"
    type = "📦 - FINALIZE"

    def __init__(self, out: str, work: str, *, keep_shards: bool) -> None:
        super().__init__()
        self.out, self.work, self.keep_shards = out, work, keep_shards

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        out, work = Path(self.out), Path(self.work)
        identity = json.loads((work / "identity.json").read_text())
        plan = json.loads((work / "plan.json").read_text())
        parts = [json.loads((work / "issues" / f"{r:05d}.json").read_text()) for r in range(plan["tasks"])]
        read = {s: sum(p["read"].get(s, 0) for p in parts) for s in plan["sources"]}
        ledgers = [json.loads(p.read_text()) for d in sorted((work / "ledger").glob("*")) if d.is_dir()
                   for p in sorted(d.glob("*.json"))]
        report = {"documents_read": read, "read_issues": IssueLog.merged([p["issues"] for p in parts]),
                  "cleaning": FilterLedger.merged(ledgers, source_order=plan["sources"]),
                  "shards": {"tasks": plan["tasks"], "input_files": len(plan["files"])},
                  "engine": engine_section(work)}
        write_json_atomic(out / "report.json", report)
        try:
            check_sources_readable(read, report["read_issues"], out / "report.json")
        except SourceError as e:
            (work / "error.txt").write_text(str(e) + "\n")
            raise
        sources = {}
        for s in identity["sources"]:
            counts = merge_source(work, out, s["name"], identity["dtype"])
            sources[s["name"]] = {**counts, "documents_read": read[s["name"]],
                                  "prefix": s["name"] if counts["documents"] else None,
                                  "files": s["files"], "format": s["format"], "path": s["path"]}
        manifest = {"manifest_version": MANIFEST_VERSION, "complete": True, "identity": identity,
                    "tokenizer": identity["tokenizer"], "dtype": identity["dtype"], "sources": sources,
                    "totals": {k: sum(v[k] for v in sources.values()) for k in ("documents", "tokens", "text_bytes")},
                    "report": "report.json"}
        write_json_atomic(out / "manifest.json", manifest)
        if not self.keep_shards:
            shutil.rmtree(work / "scratch", ignore_errors=True)
            shutil.rmtree(work / "shards", ignore_errors=True)
