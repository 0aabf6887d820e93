"""Our readers, cleaning rules, language id, tokenizer and per-filter report as datatrove pipeline steps.

    from data_pipeline.dt.steps import SourceReader, Normalize, Heuristics, LanguageId, Counted, ShardWriter
    pipeline = [SourceReader(plan_path, work), Normalize(cleaning, work), ...]   # see data_pipeline.dt.engine

Every rule is the local engine's own function (``data_pipeline.cleaning``), called per document: both engines
give the same text for the same document. Each step keeps a ``FilterLedger`` (per source, per filter:
documents/bytes in, kept, dropped by reason, modified) and writes it when its task's input is exhausted to
``WORK/ledger/<filter>/<rank>.json``; the final stage merges them into ``report.json`` in the local engine's
format. ``Counted`` does the same around datatrove's own dedup filters (it sees which documents went in and
which came out). A document carries our provenance in ``metadata``: ``source``, ``file``, ``line``, ``task``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from functools import cached_property
from itertools import groupby
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from datatrove.data import Document as DtDocument
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens.megatron_tokenizer import MegatronDocumentTokenizer
from datatrove.utils.typeshelper import StatHints

from data_pipeline.cleaning import (
    CleaningConfig,
    FilterLedger,
    heuristic_reason,
    langid_verdict,
    normalize_text,
)
from data_pipeline.langid import LanguageFilter
from data_pipeline.readers import IssueLog, read_file
from data_pipeline.shard_io import token_dtype

KILL_ENV = "LLAMA_DT_TEST_KILL"
"""Test hook ``STAGE:RANK:DOCS:MARKER``: the task RANK of stage STAGE dies by SIGKILL after DOCS documents,
once (MARKER is created first). Locally the whole process group dies (a node lost); under SLURM the task."""


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _meta(doc: DtDocument) -> dict[str, Any]:
    return {"source": doc.metadata["source"], "doc_id": doc.id, "file": doc.metadata["file"],
            "line": doc.metadata["line"]}


class SourceReader(PipelineStep):
    """Reads this task's input files (a contiguous slice of the sorted file list, ``plan.json``) with our
    readers; malformed records go to an ``IssueLog`` saved as ``WORK/issues/<rank>.json`` with the counts."""

    name = "our readers (WET / JSONL / WikiText / text / HF files)"
    type = "📖 - READER"

    def __init__(self, plan_path: str, work: str) -> None:
        super().__init__()
        self.plan_path, self.work = plan_path, work

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        plan = json.loads(Path(self.plan_path).read_text())
        issues, read = IssueLog(), Counter({s: 0 for s in plan["sources"]})
        for f in (f for f in plan["files"] if f["rank"] == rank):
            for doc in read_file(Path(f["path"]), f["source"], f["format"], issues):
                read[f["source"]] += 1
                self.stat_update(StatHints.total)
                yield DtDocument(text=doc.text, id=doc.id, metadata={"source": doc.source, "file": doc.file,
                                                                     "line": doc.line, "task": rank})
        write_json_atomic(Path(self.work) / "issues" / f"{rank:05d}.json", {"read": dict(read),
                                                                             "issues": issues.to_json()})


class RuleStep(PipelineStep):
    """One of our per-document cleaning rules; subclasses give ``rule`` and ``apply`` (new text or None)."""

    type = "🔻 - FILTER"
    rule = ""

    def __init__(self, cleaning: CleaningConfig, work: str) -> None:
        super().__init__()
        self.cleaning, self.work = cleaning, work

    def apply(self, text: str) -> tuple[str | None, str | None]:
        raise NotImplementedError

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ledger = FilterLedger()
        for doc in data:
            self.stat_update(StatHints.total)
            with self.track_time():
                new, reason = self.apply(doc.text)
            ledger.record(self.rule, **_meta(doc), before=doc.text, after=new, reason=reason)
            if new is None:
                self.stat_update(StatHints.dropped)
                continue
            self.stat_update(StatHints.forwarded)
            doc.text = new
            yield doc
        save_ledger(self.work, self.rule, rank, ledger)


def save_ledger(work: str, rule: str, rank: int, ledger: FilterLedger) -> None:
    write_json_atomic(Path(work) / "ledger" / rule / f"{rank:05d}.json", ledger.report())


class Normalize(RuleStep):
    name = "normalize (NFC, LF, no control characters)"
    rule = "normalize"

    def apply(self, text: str) -> tuple[str | None, str | None]:
        return normalize_text(text), None


class Heuristics(RuleStep):
    name = "heuristics (Gopher quality + repetition)"
    rule = "heuristics"

    def apply(self, text: str) -> tuple[str | None, str | None]:
        reason = heuristic_reason(text, self.cleaning)
        return (None, reason) if reason else (text, None)


class LanguageId(RuleStep):
    """py3langid (model inside the wheel) instead of datatrove's ``LanguageFilter``, which downloads fastText's
    lid.176 on first use."""

    name = "language id (py3langid)"
    rule = "langid"

    @cached_property
    def _filter(self) -> LanguageFilter:
        return LanguageFilter(keep=self.cleaning.keep_langs, min_prob=self.cleaning.min_lang_prob)

    def apply(self, text: str) -> tuple[str | None, str | None]:
        keep, reason = langid_verdict(self._filter, text)
        return (text, None) if keep else (None, reason)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_filter"}


class Counted(PipelineStep):
    """Runs a datatrove filter step unchanged and books what it dropped in our per-source ledger.

    The filter is order-preserving, so a document that went in and is not the next one out was dropped; the
    queue between the two holds only documents in flight."""

    type = "🫂 - DEDUP"

    def __init__(self, inner: PipelineStep, rule: str, reason: str, work: str) -> None:
        super().__init__()
        self.inner, self.rule, self.reason, self.work = inner, rule, reason, work
        self.name = f"{inner.name} (+ per-source report)"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ledger, pending = FilterLedger(), deque()

        def feed() -> Iterator[DtDocument]:
            for d in data:
                pending.append(d)
                yield d

        def book(doc: DtDocument, kept: bool) -> None:
            ledger.record(self.rule, **_meta(doc), before=doc.text, after=doc.text if kept else None,
                          reason=self.reason)

        for out in self.inner.run(feed(), rank, world_size):
            while pending and pending[0] is not out:
                book(pending.popleft(), False)
            if not pending:
                raise RuntimeError(f"{self.inner.name}: yielded a document it was not given")
            book(pending.popleft(), True)
            yield out
        while pending:
            book(pending.popleft(), False)
        self.stats = self.inner.stats
        save_ledger(self.work, self.rule, rank, ledger)


class RankJsonlReader(JsonlReader):
    """Reads exactly ``<rank>.jsonl`` of an intermediate folder (nothing if that task wrote no document):
    datatrove's ``rank::world_size`` file sharding would shift ranks when an empty task wrote no file."""

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = f"{rank:05d}.jsonl"
        if self.data_folder.isfile(name):
            yield from self.read_files_shard([name])


class SliceJsonlReader(JsonlReader):
    """Reads the previous pass's ``<r>.jsonl`` files (r < ``tasks``) as one stream cut into ``world_size``
    contiguous slices of equal bytes; task ``rank`` reads the documents whose line starts in its slice.

    Why: the input plan balances the *input* bytes, but the filters before the last pass drop unevenly (on the
    real samples most Common Crawl pages go, C4 and Wikipedia stay), so the last pass, which does most of the
    work (heuristics, language id, tokenizer), gave one task about twice the other's text. Equal bytes of
    surviving text per task fixes that. The slices stay in stream order (task r's output precedes task r+1's),
    so shards merged in task order are the same. Only for a pass whose filters key documents by their
    metadata, not by position in the task's input (``LineDedupFilter``, or none)."""

    def __init__(self, data_folder: str, *, tasks: int) -> None:
        super().__init__(data_folder, compression=None, add_file_path=False)
        self.tasks = tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import orjson

        folder = Path(self.data_folder.path)
        files = [folder / f"{r:05d}.jsonl" for r in range(self.tasks)]
        sizes = [f.stat().st_size if f.is_file() else 0 for f in files]
        total = sum(sizes)
        lo, hi, base = total * rank // world_size, total * (rank + 1) // world_size, 0
        for path, size in zip(files, sizes):
            start, end = max(lo, base) - base, min(hi, base + size) - base
            base += size
            if start >= end:
                continue
            with open(path, "rb") as f:
                pos = start
                if start > 0:  # the line that began before our slice is the previous task's
                    f.seek(start - 1)
                    pos = start - 1 + len(f.readline())
                while pos < end:
                    line = f.readline()
                    if not line:
                        break
                    with self.track_time():
                        doc = self.get_document_from_dict(orjson.loads(line), str(path), pos)
                    pos += len(line)
                    if doc:
                        self.stat_update(StatHints.total)
                        yield doc


class OurTokenizer:
    """Our tokenizer (``model/tokenizer.py``: SentencePiece or tiktoken) behind the two methods datatrove's
    Megatron writer calls on a HF ``tokenizers.Tokenizer``; EOS appended as the local engine does."""

    def __init__(self, path: str) -> None:
        from model.tokenizer import load_tokenizer

        self.tok = load_tokenizer(path)

    def get_vocab_size(self) -> int:
        return self.tok.vocab_size

    def encode_batch(self, texts: list[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(ids=self.tok.encode(t) + [self.tok.eos_id]) for t in texts]


class ShardWriter(MegatronDocumentTokenizer):
    """datatrove's Megatron ``.bin/.idx`` writer with our tokenizer: one shard per (source, task) at
    ``<output>/<source>/<rank>.{bin,idx}``, with ``.docs.jsonl`` (id, file, line per document) and
    ``.json`` (documents, tokens, text bytes) beside it for the final merge and manifest."""

    name = "✍️ Megatron writer (our tokenizer)"

    def __init__(self, output_folder: str, tokenizer_path: str, batch_size: int = 1) -> None:
        # batch_size 1: our tokenizer encodes one text at a time anyway (no batch speed-up), and a batch's token
        # lists are all alive at once: 32 Wikipedia articles' ids were ~10 MB of the task's peak memory
        super().__init__(output_folder, tokenizer_name_or_path=tokenizer_path, eos_token=None,
                         batch_size=batch_size)

    @cached_property
    def tokenizer(self) -> OurTokenizer:  # type: ignore[override]
        return OurTokenizer(self.tokenizer_name_or_path)

    @cached_property
    def token_size(self) -> int:
        return np.dtype(token_dtype(self.tokenizer.get_vocab_size())).itemsize

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        out = Path(self.output_folder.path)
        for source, docs in groupby(data, key=lambda d: d.metadata["source"]):
            prefix = out / source / f"{rank:05d}"
            prefix.parent.mkdir(parents=True, exist_ok=True)
            counts = {"documents": 0, "text_bytes": 0}
            with open(f"{prefix}.docs.jsonl", "w", encoding="utf-8") as side:
                written = self.write_tokens(self._tee(docs, side, counts), f"{source}/{rank:05d}")
            write_json_atomic(Path(f"{prefix}.json"), {**counts, "tokens": len(written)})
        return None

    @staticmethod
    def _tee(docs: Iterator[DtDocument], side: Any, counts: dict[str, int]) -> Iterator[DtDocument]:
        """Each document's provenance line in ``.docs.jsonl``, in the order its tokens are written."""
        for d in docs:
            side.write(json.dumps({"id": d.id, "file": d.metadata["file"], "line": d.metadata["line"]},
                                  ensure_ascii=False) + "\n")
            counts["documents"] += 1
            counts["text_bytes"] += len(d.text.encode("utf-8"))
            yield d

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("tokenizer", "token_size")}


class TaskProbe(PipelineStep):
    """First and last step of every task: samples the task's private memory (USS, from smaps_rollup) every
    ``SAMPLE_S`` and writes the peak, with the task's wall and CPU seconds, to ``WORK/memory/<stage>/<rank>.json``
    (the per-stage profile in ``report.json``)."""

    name = "task probe (memory)"
    type = "📊 - STATS"

    def __init__(self, stage: str, work: str, *, end: bool) -> None:
        super().__init__()
        self.stage, self.work, self.end = stage, work, end

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if not self.end:
            _MemorySampler.start()
            return data
        return self._finish(data, rank)

    def _finish(self, data: DocumentsPipeline, rank: int) -> Iterator[DtDocument]:
        if data is not None:
            yield from data
        write_json_atomic(Path(self.work) / "memory" / self.stage / f"{rank:05d}.json", _MemorySampler.stop())


class KillHook(PipelineStep):
    """Pass-through; the ``LLAMA_DT_TEST_KILL`` test hook (read at run time, so the pipeline is the same
    with and without it) kills this task mid-stage."""

    name = "kill test hook (pass-through)"
    type = "📊 - STATS"

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        kill = os.environ.get(KILL_ENV, "").split(":")
        armed = len(kill) == 4 and kill[0] == self.stage and int(kill[1]) == rank
        for i, d in enumerate(data):
            if armed and i == int(kill[2]) and not Path(kill[3]).exists():
                Path(kill[3]).write_text(f"stage {self.stage} task {rank} killed after {i} documents\n")
                if "SLURM_JOB_ID" in os.environ:
                    os.kill(os.getpid(), signal.SIGKILL)
                os.killpg(os.getpgrp(), signal.SIGKILL)
            yield d


def _private_bytes() -> int:
    try:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("Private_Clean",
                                                                                      "Private_Dirty")))
    except OSError:  # not Linux: fall back to the resident set size peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_heap() -> None:
    """Free what the worker's previous task left (a local worker runs several tasks one after the other), so that
    the memory a task is measured with is its own, not the high-water mark of the tasks before it."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


SAMPLE_S = 0.25
"""Memory sampling period. One smaps_rollup read walks the page tables of the whole (forked, ~300 MB) process:
~3-10 ms of kernel time; at 50 ms that was 5-20% of a core per task (most of the engine's system time)."""


class _MemorySampler:
    _thread: threading.Thread | None = None
    _stop = threading.Event()
    _peak = 0
    _start = 0
    _t0 = (0.0, 0.0)

    @classmethod
    def start(cls) -> None:
        cls.stop()
        _trim_heap()
        cls._stop = threading.Event()
        cls._t0 = (time.perf_counter(), time.process_time())
        cls._start = cls._peak = _private_bytes()

        def loop(stop: threading.Event = cls._stop) -> None:
            while not stop.wait(SAMPLE_S):
                cls._peak = max(cls._peak, _private_bytes())

        cls._thread = threading.Thread(target=loop, daemon=True)
        cls._thread.start()

    @classmethod
    def stop(cls) -> dict[str, Any]:
        if cls._thread is not None:
            cls._stop.set()
            cls._thread.join()
            cls._thread = None
        cls._peak = max(cls._peak, _private_bytes())
        wall, cpu = time.perf_counter() - cls._t0[0], time.process_time() - cls._t0[1]
        return {"private_bytes_at_start": cls._start, "private_bytes_peak": cls._peak,
                "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
