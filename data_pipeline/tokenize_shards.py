"""Raw files -> cleaned documents -> tokens in megatron ``.bin/.idx`` shards, in parallel, resumable.

    from data_pipeline.tokenize_shards import PrepareConfig, prepare
    manifest = prepare(PrepareConfig(sources=[SourceSpec.parse("c4=../shared/data/c4")],
                                     tokenizer="../shared/data/tokenizers/llama2/tokenizer.model",
                                     output=Path("runs/data"), workers=2))

How the work is split: the main process reads and cleans (cleaning holds the dedup indexes, so it must see
the whole stream in order) and cuts the kept documents into shards of ``shard_docs`` documents or
``shard_bytes`` bytes of text. Each shard goes to a worker process that tokenizes it (EOS appended after
every document), writes ``shards/<source>/<source>_NNNNN.{bin,idx,docs.jsonl}`` under temporary names and
renames them when complete; the main process then appends the shard to ``shards/progress.jsonl`` (the
commit point). At the end each source's shards are concatenated (as Megatron-LM's ``preprocess_data.py
--partitions`` does, but streamed: ``shard_io.merge_indexed``) into ``<source>.bin/.idx/.docs.jsonl``,
checked, and ``manifest.json`` (file hashes, tokenizer hash, counts per source) and ``report.json`` are written.

Resume: a re-run with the same inputs, tokenizer and settings re-reads and re-cleans (deterministic, so
every shard gets the same documents; a digest of its document ids and text lengths proves it) and skips
every shard in ``progress.jsonl``: nothing is tokenized twice, nothing is lost. Different inputs or
settings are refused with the differences named. Workers are forked (megatron-core takes ~5 s to import;
a forked worker inherits it and the loaded tokenizer); elsewhere they are spawned.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.cleaning import Cleaner, CleaningConfig
from data_pipeline.readers import IssueLog, SourceSpec, check_sources_readable, read_source
from data_pipeline.shard_io import mcore_datasets, merge_indexed, token_dtype, validate_indexed

MANIFEST_VERSION = 1
_TOK: Any = None  # the worker's tokenizer (inherited on fork, loaded by the initializer on spawn)


@dataclass
class PrepareConfig:
    sources: list[SourceSpec]
    tokenizer: str | Path
    output: Path
    workers: int = 2
    shard_docs: int = 20_000
    shard_bytes: int = 128 << 20
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    progress: bool = True
    keep_shards: bool = False


class PrepareInterrupted(RuntimeError):
    """Raised by the ``stop_after_shards`` test hook to simulate a crash mid-run."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_pipeline_tokenizer(path: str | Path) -> Any:
    from model.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _init_worker(tokenizer_path: str) -> None:
    global _TOK
    if _TOK is None:
        _TOK = load_pipeline_tokenizer(tokenizer_path)


def _write_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one shard and write it under temporary names, then rename (runs in a worker)."""
    tok = _TOK if _TOK is not None else load_pipeline_tokenizer(task["tokenizer"])
    mc = mcore_datasets()
    import torch

    prefix, dtype, eos = task["prefix"], np.dtype(task["dtype"]).type, tok.eos_id
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = mc.IndexedDatasetBuilder(f"{prefix}.tmp.bin", dtype=dtype)
    n_tokens = 0
    with open(f"{prefix}.tmp.docs.jsonl", "w", encoding="utf-8") as side:
        for text, (doc_id, file, line) in zip(task["texts"], task["meta"]):
            ids = tok.encode(text)
            ids.append(eos)
            builder.add_item(torch.from_numpy(np.asarray(ids, dtype=np.int32)))
            builder.end_document()
            n_tokens += len(ids)
            side.write(json.dumps({"id": doc_id, "file": file, "line": line, "tokens": len(ids)},
                                  ensure_ascii=False) + "\n")
    builder.finalize(f"{prefix}.tmp.idx")
    for ext in ("bin", "docs.jsonl", "idx"):  # .idx last: a complete .idx implies a complete .bin
        os.replace(f"{prefix}.tmp.{ext}", f"{prefix}.{ext}")
    return {"shard": task["name"], "source": task["source"], "documents": len(task["texts"]),
            "tokens": n_tokens, "text_bytes": task["text_bytes"], "digest": task["digest"]}


def source_files_identity(sources: list[SourceSpec]) -> list[dict[str, Any]]:
    """Name, path, format and (path, size, sha256) of every input file; an unreadable file is an error
    naming its source."""
    out = []
    for spec in sources:
        files = []
        for f in spec.files():
            try:
                files.append({"path": str(f), "bytes": f.stat().st_size, "sha256": file_sha256(f)})
            except OSError as e:
                raise ValueError(f"source {spec.name!r}: cannot read {f}: {e.strerror or e}; fix the file's "
                                 "permissions or remove it from the --source") from e
        out.append({"name": spec.name, "path": spec.path, "format": spec.format, "files": files})
    return out


def tokenizer_identity(path: str | Path, tok: Any) -> dict[str, Any]:
    return {"path": str(path), "sha256": tok.file_hash(), "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "kind": type(tok).__name__}


def _identity(cfg: PrepareConfig, tok: Any) -> dict[str, Any]:
    """Everything that determines the output; a resumed run must match it exactly."""
    sources = source_files_identity(cfg.sources)
    ident = {"manifest_version": MANIFEST_VERSION, "sources": sources,
            "tokenizer": tokenizer_identity(cfg.tokenizer, tok),
            "dtype": np.dtype(token_dtype(tok.vocab_size)).name, "cleaning": cfg.cleaning.to_json(),
            "shard_docs": cfg.shard_docs, "shard_bytes": cfg.shard_bytes}
    return json.loads(json.dumps(ident))  # the form it has after a round trip through manifest.json


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k != "tokenizer" and a.get(k) != b.get(k)] + (
        ["tokenizer"] if {k: v for k, v in a.get("tokenizer", {}).items() if k != "path"}
        != {k: v for k, v in b.get("tokenizer", {}).items() if k != "path"} else [])


class _ShardRunner:
    """Submits shards to the pool (bounded in flight), records completions, skips already-done shards."""

    def __init__(self, cfg: PrepareConfig, out: Path, dtype: str, done: dict[str, dict],
                 stop_after_shards: int | None) -> None:
        self.cfg, self.out, self.dtype, self.done = cfg, out, dtype, done
        self.stop_after = stop_after_shards
        self.pending: deque = deque()
        self.new, self.skipped = 0, 0
        self.shards: dict[str, list[str]] = {s.name: [] for s in cfg.sources}
        self.progress = open(out / "shards" / "progress.jsonl", "a", encoding="utf-8")
        self.pool = None
        if cfg.workers > 0:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(str(cfg.tokenizer),))

    def prefix(self, source: str, name: str) -> Path:
        return self.out / "shards" / source / name

    def submit(self, source: str, k: int, texts: list[str], meta: list[tuple[str, str, int]]) -> None:
        name = f"{source}_{k:05d}"
        self.shards[source].append(name)
        h = hashlib.blake2b(digest_size=16)
        for (doc_id, _, _), text in zip(meta, texts):
            h.update(f"{doc_id}\x00{len(text)}\x00".encode())
        digest = h.hexdigest()
        prev = self.done.get(name)
        if prev is not None:
            if prev["digest"] != digest:
                raise ValueError(f"{self.out}/shards/progress.jsonl: shard {name} was written from different "
                                 "documents than this run produces (inputs changed?); use a fresh --output")
            if Path(f"{self.prefix(source, name)}.idx").is_file():
                self.skipped += 1
                return
        task = {"name": name, "source": source, "prefix": str(self.prefix(source, name)), "texts": texts,
                "meta": meta, "dtype": self.dtype, "tokenizer": str(self.cfg.tokenizer), "digest": digest,
                "text_bytes": sum(len(t.encode("utf-8")) for t in texts)}
        if self.pool is None:
            self._commit(_write_shard(task))
            return
        self.pending.append(self.pool.apply_async(_write_shard, (task,)))
        while len(self.pending) > 2 * self.cfg.workers:
            self._commit(self.pending.popleft().get())

    def _commit(self, info: dict[str, Any]) -> None:
        self.progress.write(json.dumps(info) + "\n")
        self.progress.flush()
        os.fsync(self.progress.fileno())
        self.done[info["shard"]] = info
        self.new += 1
        if self.stop_after is not None and self.new >= self.stop_after:
            self.close(terminate=True)
            raise PrepareInterrupted(f"stopped after {self.new} shards (test hook)")

    def drain(self) -> None:
        while self.pending:
            self._commit(self.pending.popleft().get())

    def close(self, terminate: bool = False) -> None:
        if self.pool is not None:
            (self.pool.terminate if terminate else self.pool.close)()
            self.pool.join()
            self.pool = None
        self.progress.close()


def _load_progress(out: Path, identity: dict[str, Any]) -> dict[str, dict]:
    (out / "shards").mkdir(parents=True, exist_ok=True)
    ident_path = out / "shards" / "identity.json"
    if ident_path.is_file():
        prev = json.loads(ident_path.read_text())
        if prev != identity:
            raise ValueError(f"{out}: holds an interrupted run with different {', '.join(_diff(prev, identity))}; "
                             "resume with the same sources, tokenizer and settings, or use a fresh --output")
    else:
        ident_path.write_text(json.dumps(identity, indent=1))
    done: dict[str, dict] = {}
    prog = out / "shards" / "progress.jsonl"
    if prog.is_file():
        for line in prog.read_text().splitlines():
            try:
                info = json.loads(line)
                done[info["shard"]] = info
            except (json.JSONDecodeError, KeyError):
                continue  # a line torn by the interruption: that shard is simply redone
    for tmp in (out / "shards").rglob("*.tmp.*"):
        tmp.unlink()
    return done


def _merge_source(out: Path, source: str, names: list[str], done: dict[str, dict], dtype: str) -> dict[str, int]:
    """Concatenate a source's shards into ``<source>.bin/.idx/.docs.jsonl`` (streaming) and check the result."""
    docs = sum(done[n]["documents"] for n in names)
    tokens = sum(done[n]["tokens"] for n in names)
    prefixes = [out / "shards" / source / n for n in names]
    for n, prefix in zip(names, prefixes):
        validate_indexed(prefix, expect_docs=done[n]["documents"], expect_tokens=done[n]["tokens"],
                         expect_dtype=np.dtype(dtype).type)
    with open(out / f"{source}.tmp.docs.jsonl", "wb") as side:
        for prefix in prefixes:
            with open(f"{prefix}.docs.jsonl", "rb") as f:
                shutil.copyfileobj(f, side)
    os.replace(out / f"{source}.tmp.docs.jsonl", out / f"{source}.docs.jsonl")
    merge_indexed(prefixes, out / source)
    validate_indexed(out / source, expect_docs=docs, expect_tokens=tokens)
    return {"documents": docs, "tokens": tokens, "text_bytes": sum(done[n]["text_bytes"] for n in names),
            "shards": len(names), "bin_bytes": (out / f"{source}.bin").stat().st_size}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def prepare(cfg: PrepareConfig, *, stop_after_shards: int | None = None) -> dict[str, Any]:
    """Run (or resume, or no-op if complete) the pipeline; returns the manifest."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if len({s.name for s in cfg.sources}) != len(cfg.sources):
        raise ValueError(f"--source names must be unique, got {[s.name for s in cfg.sources]}")
    tok = load_pipeline_tokenizer(cfg.tokenizer)
    identity = _identity(cfg, tok)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        m = json.loads(manifest_path.read_text())
        if m.get("identity") == identity:
            return m
        raise ValueError(f"{manifest_path}: a finished run with different {', '.join(_diff(m.get('identity', {}), identity))}; "
                         "use a fresh --output directory")
    done = _load_progress(out, identity)
    global _TOK
    _TOK = tok  # inherited by forked workers
    mcore_datasets()  # import before forking so that workers do not pay for it
    cleaner, issues, read = Cleaner(cfg.cleaning), IssueLog(), Counter()
    runner = _ShardRunner(cfg, out, identity["dtype"], done, stop_after_shards)
    try:
        _stream(cfg, runner, cleaner, issues, read)
        runner.drain()
    except BaseException:
        runner.close(terminate=True)
        raise
    runner.close()
    report = {"documents_read": dict(read), "read_issues": issues.to_json(), "cleaning": cleaner.report(),
              "shards": {"tokenized_this_run": runner.new, "skipped_already_done": runner.skipped}}
    _write_json(out / "report.json", report)
    check_sources_readable({s.name: read[s.name] for s in cfg.sources}, report["read_issues"], out / "report.json")
    sources = {}
    for s in identity["sources"]:
        names = runner.shards[s["name"]]
        counts = (_merge_source(out, s["name"], names, done, identity["dtype"]) if names else
                  {"documents": 0, "tokens": 0, "text_bytes": 0, "shards": 0, "bin_bytes": 0})
        sources[s["name"]] = {**counts, "documents_read": read[s["name"]], "prefix": s["name"] if names else None,
                              "files": s["files"], "format": s["format"], "path": s["path"]}
    manifest = {"manifest_version": MANIFEST_VERSION, "complete": True, "identity": identity,
                "tokenizer": identity["tokenizer"], "dtype": identity["dtype"], "sources": sources,
                "totals": {k: sum(v[k] for v in sources.values()) for k in ("documents", "tokens", "text_bytes")},
                "report": "report.json"}
    _write_json(manifest_path, manifest)
    if not cfg.keep_shards:
        shutil.rmtree(out / "shards", ignore_errors=True)
    return manifest


def _stream(cfg: PrepareConfig, runner: _ShardRunner, cleaner: Cleaner, issues: IssueLog, read: Counter) -> None:
    from tqdm import tqdm

    with tqdm(desc="prepare", unit="doc", disable=None if cfg.progress else True, mininterval=1.0) as bar:
        for spec in cfg.sources:
            k, texts, meta, nbytes = 0, [], [], 0
            for doc in read_source(spec, issues):
                read[spec.name] += 1
                bar.update()
                d = cleaner.process(doc)
                if d is None:
                    continue
                texts.append(d.text)
                meta.append((d.id, d.file, d.line))
                nbytes += len(d.text)
                if len(texts) >= cfg.shard_docs or nbytes >= cfg.shard_bytes:
                    runner.submit(spec.name, k, texts, meta)
                    k, texts, meta, nbytes = k + 1, [], [], 0
                    bar.set_postfix(shards_done=len(runner.done))
            if texts:
                runner.submit(spec.name, k, texts, meta)
