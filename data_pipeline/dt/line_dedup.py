"""Our CCNet-style line dedup, distributed in the three-stage shape of datatrove's exact/sentence dedups.

    LineDedupSignature(sigs, finder_tasks=F, cleaning=cfg)   # per task: (line hash, doc, line) runs, sorted
    LineDedupFind(sigs, dups, cleaning=cfg)                   # F tasks, one hash range each
    LineDedupFilter(dups, cleaning=cfg, work=WORK)            # any slice: drop the lines found, book the ledger

The rule is the local engine's (``Cleaner._line_dedup``): within a bucket of ``line_dedup_bucket_docs``
documents (counted in stream order over the sources being line-deduped), the first ``max_line_repeats``
occurrences of a line (by ``dedup_key``) are kept and later ones removed; a document left empty is dropped.
Stream order is (task, document index in the task), the same order the local engine reads in, because tasks
read contiguous slices of the sorted file list. datatrove's ``SentenceDedup`` with ``split_sentences=False``
is close but not the same rule (its keeper is the lowest document index in *any* task, its text
normalisation differs, it has neither buckets nor repeat counts), so it is not used.

Stage 1 stamps each line-deduped document with its key, ``metadata["task"]`` (already there) and
``metadata["line_doc"]`` (its index among the task's line-deduped documents), and passes it on; stage 3 finds
a document's removals by that key, not by its position, so the pass after the barrier may split the documents
among its tasks differently (``data_pipeline.dt.steps.SliceJsonlReader``: equal bytes of surviving text).

Memory per task: a signature run is flushed (sorted) every ``RUN_RECORDS`` lines; the finder streams a heap
merge over the runs; the filter holds the removals of one origin task at a time (two uint32 per removed line).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import StatHints

from data_pipeline.cleaning import CleaningConfig, FilterLedger, line_hashes, remove_lines
from data_pipeline.dt.steps import _meta, save_ledger

SIG_DTYPE = np.dtype([("hash", "<u8"), ("doc", "<u4"), ("line", "<u4")])
DUP_DTYPE = np.dtype([("doc", "<u4"), ("line", "<u4")])
RUN_RECORDS = 1 << 18  # 4 MB of signatures per sorted run (one numpy buffer, reused), whatever the input size


def line_dedup_applies(cleaning: CleaningConfig, source: str) -> bool:
    return cleaning.line_dedup and (cleaning.line_dedup_sources is None or source in cleaning.line_dedup_sources)


class LineDedupSignature(PipelineStep):
    """Stage 1: for every line-deduped document, (64-bit hash of its dedup key, document index among the
    task's line-deduped documents, line index), in sorted runs split by hash range over the finder tasks;
    and ``counts/<rank>.json`` (how many line-deduped documents this task has: the bucket offsets). Every
    document is passed on (line-deduped ones with ``metadata["line_doc"]``): put the scratch writer after it."""

    type = "🫂 - DEDUP"
    name = "line dedup stage 1 (our dedup_key)"

    def __init__(self, output_folder: str, *, finder_tasks: int, cleaning: CleaningConfig) -> None:
        super().__init__()
        self.output_folder, self.finder_tasks, self.cleaning = output_folder, finder_tasks, cleaning

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        out = Path(self.output_folder)
        # one preallocated run buffer, filled in place: a small array per document kept until the flush pinned
        # the allocator's pages around it, and the task's private memory grew with its input (16 -> 31 MB at 4x)
        buf = np.empty(RUN_RECORDS, dtype=SIG_DTYPE)
        runs, n_docs, n_buf = 0, 0, 0
        for doc in data:
            self.stat_update(StatHints.total)
            if not line_dedup_applies(self.cleaning, doc.metadata["source"]):
                yield doc
                continue
            lines = line_hashes(doc.text)
            while lines:  # a document longer than the space left continues in the next run
                take = min(len(lines), RUN_RECORDS - n_buf)
                rec = buf[n_buf : n_buf + take]
                rec["line"], rec["hash"] = zip(*lines[:take])
                rec["doc"] = n_docs
                n_buf, lines = n_buf + take, lines[take:]
                if n_buf == RUN_RECORDS:
                    self._flush(out, rank, runs, buf[:n_buf])
                    runs, n_buf = runs + 1, 0
            doc.metadata["line_doc"] = n_docs
            n_docs += 1
            yield doc
        if n_buf or runs == 0:
            self._flush(out, rank, runs, buf[:n_buf])
        (out / "counts").mkdir(parents=True, exist_ok=True)
        (out / "counts" / f"{rank:05d}.json").write_text(json.dumps({"documents": n_docs}))

    def _flush(self, out: Path, rank: int, run: int, sigs: np.ndarray) -> None:
        sigs.sort(order=("hash", "doc", "line"))  # in place, in the run buffer
        cut = [0] + [int(np.searchsorted(sigs["hash"], np.uint64((f * 2**64) // self.finder_tasks)))
                     for f in range(1, self.finder_tasks)] + [len(sigs)]
        for f in range(self.finder_tasks):
            path = out / f"{f:04d}" / f"{rank:05d}_{run:04d}.line_sig"
            path.parent.mkdir(parents=True, exist_ok=True)
            sigs[cut[f] : cut[f + 1]].tofile(path)


def _records(path: Path, task: int, chunk: int = 8192) -> Iterator[tuple[int, int, int, int]]:
    n = path.stat().st_size // SIG_DTYPE.itemsize
    with open(path, "rb") as f:
        for start in range(0, n, chunk):
            block = np.fromfile(f, dtype=SIG_DTYPE, count=min(chunk, n - start))
            yield from ((int(h), task, int(d), int(ln)) for h, d, ln in zip(block["hash"], block["doc"],
                                                                              block["line"]))


class LineDedupFind(PipelineStep):
    """Stage 2 (task r of F: hash range r): merges every task's runs in (hash, task, doc, line) order, i.e.
    stream order per line; every occurrence after the first ``max_line_repeats`` of its bucket is a removal,
    written to ``<dups>/<r>/<task>.line_dup``."""

    type = "🫂 - DEDUP"
    name = "line dedup stage 2"

    def __init__(self, data_folder: str, output_folder: str, *, cleaning: CleaningConfig) -> None:
        super().__init__()
        self.data_folder, self.output_folder, self.cleaning = data_folder, output_folder, cleaning

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        sigs, out = Path(self.data_folder), Path(self.output_folder) / f"{rank:04d}"
        counts = sorted((sigs / "counts").glob("*.json"))
        sizes = [json.loads(p.read_text())["documents"] for p in counts]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        streams = [_records(p, int(p.name.split("_")[0])) for p in sorted((sigs / f"{rank:04d}").glob("*.line_sig"))]
        out.mkdir(parents=True, exist_ok=True)
        files: dict[int, object] = {}
        bucket_docs, limit = self.cleaning.line_dedup_bucket_docs, self.cleaning.max_line_repeats
        last_hash, last_bucket, seen = None, -1, 0
        try:
            for h, task, doc, line in heapq.merge(*streams):
                bucket = int(offsets[task] + doc) // bucket_docs
                if h != last_hash or bucket != last_bucket:
                    last_hash, last_bucket, seen = h, bucket, 0
                seen += 1
                if seen > limit:
                    if task not in files:
                        files[task] = open(out / f"{task:05d}.line_dup", "wb")  # noqa: SIM115
                    files[task].write(np.array([(doc, line)], dtype=DUP_DTYPE).tobytes())
                    self.stat_update("lines_removed")
        finally:
            for f in files.values():
                f.close()


class LineDedupFilter(PipelineStep):
    """Stage 3: removes the duplicate lines stage 2 found for each document (by its ``task`` and ``line_doc``
    stamp, in whatever slice of the stream this task reads) and books ``line_dedup`` in the ledger."""

    type = "🫂 - DEDUP"
    name = "line dedup stage 3"

    def __init__(self, data_folder: str, *, cleaning: CleaningConfig, work: str) -> None:
        super().__init__()
        self.data_folder, self.cleaning, self.work = data_folder, cleaning, work

    def _removals(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        """Task ``task``'s removals sorted by (doc, line), and where each of its documents starts in them."""
        parts = [np.fromfile(p, dtype=DUP_DTYPE) for p in sorted(Path(self.data_folder).glob(f"*/{task:05d}.line_dup"))]
        dups = np.concatenate(parts) if parts else np.zeros(0, dtype=DUP_DTYPE)
        dups.sort(order=("doc", "line"))
        return dups, np.searchsorted(dups["doc"], np.arange(0, (int(dups["doc"][-1]) + 2) if len(dups) else 1))

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ledger, task, dups, starts = FilterLedger(), None, None, None
        for doc in data:
            self.stat_update(StatHints.total)
            if not line_dedup_applies(self.cleaning, doc.metadata["source"]):
                yield doc
                continue
            if doc.metadata["task"] != task:  # a slice is contiguous: one origin task after the other
                task = doc.metadata["task"]
                dups, starts = self._removals(task)
            k = doc.metadata["line_doc"]
            lines = dups["line"][starts[k] : starts[k + 1]] if k + 1 < len(starts) else ()
            new = remove_lines(doc.text, lines.tolist()) if len(lines) else doc.text
            empty = not new.strip()
            ledger.record("line_dedup", **_meta(doc), before=doc.text, after=None if empty else new,
                          reason="emptied_by_line_dedup")
            if empty:
                self.stat_update(StatHints.dropped)
                continue
            doc.text = new
            self.stat_update(StatHints.forwarded)
            yield doc
        save_ledger(self.work, "line_dedup", rank, ledger)
