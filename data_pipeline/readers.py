"""Streaming readers: raw corpus files -> ``Document`` records (text, source, id, file, line).

    from data_pipeline.readers import SourceSpec, read_source, IssueLog
    issues = IssueLog()
    for doc in read_source(SourceSpec.parse("cc=../shared/data/commoncrawl:jsonl"), issues):
        ...

Formats (``FORMAT`` in ``NAME=PATH[:FORMAT]``; inferred from the file name when omitted):
  ``wet``       Common Crawl WET files (WARC ``conversion`` records), gzip or plain.
  ``jsonl``     JSON lines in the Dolma (``id``, ``text``, ``metadata.url``), RedPajama (``text``, ``meta``),
                CCNet (``raw_content``, ``url``, ``digest``) or C4 (``text``, ``url``) shapes; ``.gz`` ok.
  ``wikitext``  WikiText / Wikipedia plain text; one article per level-1 heading line `` = Title = ``.
  ``text``      plain text, one document per blank-line-separated block.
  ``hf``        anything Hugging Face ``datasets`` reads from local files (json, parquet, csv, arrow, text),
                streamed; a PATH that is not a local file is taken as a hub dataset name (needs network).

Nothing loads a whole file: every reader iterates line by line (or record by record). Bad input never
crashes the run and never vanishes: a corrupt/truncated gzip member, a malformed JSON line, non-UTF-8
bytes, a record without text, an empty document are appended to ``IssueLog`` with file and line, and the
reader moves on (after a corrupt gzip stream nothing more can be read from that file; that is reported).
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

FORMATS = ("wet", "jsonl", "wikitext", "text", "hf")
_HF_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".json": "json", ".jsonl": "json",
                ".txt": "text"}


@dataclass
class Document:
    """One document and where it came from (kept through cleaning into the shard's ``.docs.jsonl``)."""

    text: str
    source: str
    id: str
    file: str
    line: int
    """1-based line (or WARC record number for ``wet``, row number for ``hf``) where the document starts."""


@dataclass
class Issue:
    """A malformed or unusable input record, with its location."""

    source: str
    file: str
    line: int
    kind: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "file": self.file, "line": self.line, "kind": self.kind,
                "detail": self.detail}


@dataclass
class IssueLog:
    """Counts every issue by kind and keeps the first ``max_kept`` with file and line for the report."""

    max_kept: int = 10_000
    counts: Counter = field(default_factory=Counter)
    by_source: Counter = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)

    def add(self, source: str, file: str | Path, line: int, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.by_source[source] += 1
        if len(self.issues) < self.max_kept:
            self.issues.append(Issue(source, str(file), int(line), kind, detail[:300]))

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "by_source": dict(sorted(self.by_source.items())),
                "issues": [i.to_json() for i in self.issues],
                "truncated": sum(self.counts.values()) > len(self.issues)}

    @classmethod
    def merged(cls, parts: list[dict[str, Any]], max_kept: int = 10_000) -> dict[str, Any]:
        """The ``to_json`` of several logs (one per distributed task, in task order) as one."""
        counts, by_source, issues = Counter(), Counter(), []
        for p in parts:
            counts.update(p["counts"])
            by_source.update(p.get("by_source", {}))
            issues.extend(p["issues"][: max(0, max_kept - len(issues))])
        return {"counts": dict(sorted(counts.items())), "by_source": dict(sorted(by_source.items())),
                "issues": issues, "truncated": sum(counts.values()) > len(issues)}


class SourceError(ValueError):
    """A source that yielded no usable document: every record malformed, or every file unreadable."""


def check_sources_readable(read: dict[str, int], issues: dict[str, Any], report_path: Path) -> None:
    """Fail (naming the source) when a source produced no document at all; the report is already written.

    A source whose records were all dropped by *cleaning* is fine (its manifest entry has 0 documents); one
    whose records were all malformed or whose files could not be read means the input is broken, and a
    ``complete: true`` manifest would hide that."""
    bad = [name for name, n in read.items() if n == 0]
    if not bad:
        return
    lines = []
    for name in bad:
        kinds = Counter(i["kind"] for i in issues["issues"] if i["source"] == name)
        first = next((i for i in issues["issues"] if i["source"] == name), None)
        where = f"; first: {first['file']}:{first['line']}: {first['kind']}: {first['detail']}" if first else ""
        lines.append(f"source {name!r}: no usable document ({issues.get('by_source', {}).get(name, 0)} malformed "
                     f"or unreadable records{', ' + ', '.join(f'{k}={v}' for k, v in kinds.items()) if kinds else ''}"
                     f"{where})")
    raise SourceError("; ".join(lines) + f". Every record is listed with file and line in {report_path} "
                      "(read_issues.issues); fix the input or remove the --source")


def issue_summary(issues: dict[str, Any], report_path: Path, examples: int = 3) -> list[str]:
    """Console lines: how many records were malformed (by kind and source) and where the full list is."""
    total = sum(issues["counts"].values())
    if total == 0:
        return ["malformed or unusable records: none"]
    kinds = ", ".join(f"{k}={v}" for k, v in issues["counts"].items())
    srcs = ", ".join(f"{k}={v}" for k, v in issues.get("by_source", {}).items())
    out = [f"malformed or unusable records: {total:,} ({kinds}; by source: {srcs}) - skipped and listed with "
           f"file and line in {report_path} (read_issues.issues{', first 10,000' if issues['truncated'] else ''})"]
    out += [f"    {i['file']}:{i['line']}: {i['kind']}: {i['detail']}" for i in issues["issues"][:examples]]
    return out


@dataclass(frozen=True)
class SourceSpec:
    """``NAME=PATH[:FORMAT]`` from the command line. PATH may be a file, a directory or a glob."""

    name: str
    path: str
    format: str | None = None

    @classmethod
    def parse(cls, spec: str) -> SourceSpec:
        if "=" not in spec:
            raise ValueError(f"--source {spec!r}: expected NAME=PATH[:FORMAT] (formats: {', '.join(FORMATS)})")
        name, rest = spec.split("=", 1)
        fmt = None
        head, sep, tail = rest.rpartition(":")
        if sep and tail in FORMATS:
            rest, fmt = head, tail
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--source {spec!r}: NAME must be letters, digits, '-' or '_'")
        return cls(name=name, path=rest, format=fmt)

    def files(self) -> list[Path]:
        """The input files, sorted (a deterministic order is part of the output's identity)."""
        p = Path(self.path)
        if p.is_dir():
            out = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(("LICENSE", ".")))
            out = [f for f in out if not f.name.endswith(".md")]
        elif p.is_file():
            out = [p]
        else:
            out = sorted(Path(f) for f in glob.glob(self.path))
        if not out and self.format != "hf":
            raise FileNotFoundError(f"source {self.name!r}: no input files at {self.path!r}")
        return out


def infer_format(path: Path) -> str:
    name = path.name.lower()
    if ".wet" in name or name.endswith(".warc.gz") or name.endswith(".warc"):
        return "wet"
    stem = name[:-3] if name.endswith(".gz") else name
    if stem.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if stem.endswith((".txt", ".raw", ".tokens")):
        return "wikitext" if "wiki" in name else "text"
    if Path(stem).suffix in _HF_BUILDERS:
        return "hf"
    raise ValueError(f"{path}: cannot infer the format from the name; give NAME=PATH:FORMAT ({', '.join(FORMATS)})")


def _open_binary(path: Path) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # multi-member gzip (WET files are one member per record) is handled
    return open(path, "rb")


def _lines(path: Path, source: str, issues: IssueLog) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line bytes). A corrupt or truncated gzip stream is reported, not raised."""
    n = 0
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(f, 1):  # noqa: B007 - n is read after the loop on error
                yield n, raw
    except (OSError, EOFError, zlib.error) as e:
        issues.add(source, path, n + 1, "corrupt_compressed_stream",
                   f"{type(e).__name__}: {e}; the rest of this file is unreadable")


def _decode(raw: bytes, path: Path, line: int, source: str, issues: IssueLog) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        issues.add(source, path, line, "non_utf8", f"{e}; record skipped")
        return None


def _dig(obj: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


_TEXT_FIELDS = ("text", "raw_content", "content")
_ID_FIELDS = ("id", "metadata.url", "url", "meta.url", "digest", "metadata.digest")


def record_to_document(rec: Any, *, source: str, path: Path, line: int, issues: IssueLog) -> Document | None:
    """A parsed JSON record (any of the supported shapes) -> Document, or None (reported) if unusable."""
    if not isinstance(rec, dict):
        issues.add(source, path, line, "bad_record", f"expected a JSON object, got {type(rec).__name__}")
        return None
    text = next((rec[k] for k in _TEXT_FIELDS if isinstance(rec.get(k), str)), None)
    if text is None:
        issues.add(source, path, line, "missing_text", f"no string field among {_TEXT_FIELDS}; keys={sorted(rec)[:8]}")
        return None
    if not text.strip():
        issues.add(source, path, line, "empty_document", "text is empty or whitespace")
        return None
    doc_id = next((str(v) for k in _ID_FIELDS if (v := _dig(rec, k)) not in (None, "")), f"{path.name}:{line}")
    return Document(text=text, source=source, id=doc_id, file=str(path), line=line)


def read_jsonl(path: Path, source: str, issues: IssueLog) -> Iterator[Document]:
    for line, raw in _lines(path, source, issues):
        if not raw.strip():
            continue
        s = _decode(raw, path, line, source, issues)
        if s is None:
            continue
        try:
            rec = json.loads(s)
        except json.JSONDecodeError as e:
            issues.add(source, path, line, "malformed_json", f"{e.msg} at column {e.colno}")
            continue
        doc = record_to_document(rec, source=source, path=path, line=line, issues=issues)
        if doc is not None:
            yield doc


def _warc_records(path: Path, source: str, issues: IssueLog) -> Iterator[tuple[int, dict[str, str], bytes]]:
    """(record number, headers, payload) for each WARC record, streamed."""
    recno = 0
    try:
        with _open_binary(path) as f:
            while True:
                line = f.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                if not line.startswith(b"WARC/"):
                    issues.add(source, path, recno + 1, "bad_warc_record", f"expected 'WARC/' got {line[:40]!r}")
                    continue
                recno += 1
                headers: dict[str, str] = {}
                while (h := f.readline()).strip():
                    k, _, v = h.decode("utf-8", "replace").partition(":")
                    headers[k.strip().lower()] = v.strip()
                try:
                    length = int(headers.get("content-length", "0"))
                except ValueError:
                    issues.add(source, path, recno, "bad_warc_record", "Content-Length is not an integer")
                    continue
                payload = f.read(length)
                if len(payload) < length:
                    issues.add(source, path, recno, "truncated_record", f"payload {len(payload)} < {length} bytes")
                    return
                yield recno, headers, payload
    except (OSError, EOFError, zlib.error) as e:
        issues.add(source, path, recno + 1, "corrupt_compressed_stream",
                   f"{type(e).__name__}: {e}; the rest of this file is unreadable")


def read_wet(path: Path, source: str, issues: IssueLog) -> Iterator[Document]:
    for recno, headers, payload in _warc_records(path, source, issues):
        if headers.get("warc-type") != "conversion":
            continue  # warcinfo / metadata records carry no page text
        text = _decode(payload, path, recno, source, issues)
        if text is None:
            continue
        if not text.strip():
            issues.add(source, path, recno, "empty_document", "WET conversion record with no text")
            continue
        doc_id = headers.get("warc-target-uri") or headers.get("warc-record-id") or f"{path.name}:{recno}"
        yield Document(text=text, source=source, id=doc_id, file=str(path), line=recno)


def _flush(buf: list[str], *, source: str, path: Path, start: int, doc_id: str, issues: IssueLog) -> Document | None:
    text = "\n".join(buf).strip()  # WikiText lines start with a space; SentencePiece would not round-trip it
    if not text.strip():
        if buf:
            issues.add(source, path, start, "empty_document", "block has no text")
        return None
    return Document(text=text, source=source, id=doc_id, file=str(path), line=start)


def read_wikitext(path: Path, source: str, issues: IssueLog) -> Iterator[Document]:
    """WikiText: an article starts at a level-1 heading `` = Title = `` (not `` = = Section = = ``).

    CRLF line endings are folded to LF; lines keep their WikiText spacing (the text is what the corpus is)."""
    buf: list[str] = []
    title, start = f"{path.name}:1", 1
    for line, raw in _lines(path, source, issues):
        s = _decode(raw, path, line, source, issues)
        if s is None:
            continue
        s = s.rstrip("\r\n").rstrip("\r")
        stripped = s.strip()
        if stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= ="):
            doc = _flush(buf, source=source, path=path, start=start, doc_id=title, issues=issues)
            if doc is not None:
                yield doc
            buf, title, start = [s], stripped.strip("= ").strip(), line
        else:
            buf.append(s)
    doc = _flush(buf, source=source, path=path, start=start, doc_id=title, issues=issues)
    if doc is not None:
        yield doc


def read_text(path: Path, source: str, issues: IssueLog) -> Iterator[Document]:
    """Plain text: documents separated by one or more blank lines."""
    buf: list[str] = []
    start = 1
    for line, raw in _lines(path, source, issues):
        s = _decode(raw, path, line, source, issues)
        if s is None:
            continue
        s = s.rstrip("\r\n").rstrip("\r")
        if s.strip():
            if not buf:
                start = line
            buf.append(s)
        elif buf:
            doc = _flush(buf, source=source, path=path, start=start, doc_id=f"{path.name}:{start}", issues=issues)
            if doc is not None:
                yield doc
            buf = []
    if buf:
        doc = _flush(buf, source=source, path=path, start=start, doc_id=f"{path.name}:{start}", issues=issues)
        if doc is not None:
            yield doc


def read_hf(path: str | Path, source: str, issues: IssueLog) -> Iterator[Document]:
    """Hugging Face ``datasets`` in streaming mode (rows never all in memory). Local files or a hub name."""
    import datasets  # local import: ~1 s, only paid when this format is used

    p = Path(path)
    if p.exists():
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        builder = _HF_BUILDERS.get(Path(name).suffix)
        if builder is None:
            raise ValueError(f"{p}: Hugging Face datasets cannot read {Path(name).suffix!r} files; "
                             f"use one of {sorted(_HF_BUILDERS)}")
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True)
    else:
        ds = datasets.load_dataset(str(path), split="train", streaming=True)
    for row_no, row in enumerate(ds, 1):
        doc = record_to_document(row, source=source, path=p, line=row_no, issues=issues)
        if doc is not None:
            yield doc


_READERS = {"wet": read_wet, "jsonl": read_jsonl, "wikitext": read_wikitext, "text": read_text, "hf": read_hf}


def read_file(path: Path, source: str, fmt: str | None, issues: IssueLog) -> Iterator[Document]:
    """All documents of one local file in the given (or inferred) format."""
    return _READERS[fmt or infer_format(path)](path, source, issues)


def read_source(spec: SourceSpec, issues: IssueLog) -> Iterator[Document]:
    """All documents of one source, files in sorted order, each file streamed."""
    files = spec.files()
    if not files and spec.format == "hf":  # a hub dataset name
        yield from read_hf(spec.path, spec.name, issues)
        return
    for path in files:
        yield from read_file(path, spec.name, spec.format, issues)


def read_text_of(doc_file: str, line: int, fmt: str | None = None) -> str | None:
    """Re-read one document's raw text from its file and line (used by ``inspect`` and tests)."""
    path = Path(doc_file)
    fmt = fmt or infer_format(path)
    issues = IssueLog()
    for doc in _READERS[fmt](path, "inspect", issues):
        if doc.line == line:
            return doc.text
    return None


__all__ = ["Document", "Issue", "IssueLog", "SourceError", "SourceSpec", "check_sources_readable", "issue_summary", "FORMATS", "infer_format", "read_source",
           "read_file", "read_jsonl", "read_wet", "read_wikitext", "read_text", "read_hf", "record_to_document",
           "read_text_of"]
