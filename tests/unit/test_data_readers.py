"""Streaming readers: formats, ids, and bad input counted with file and line (never raised, never lost).

    pytest tests/unit/test_data_readers.py
"""

from __future__ import annotations

import gzip
import json

import pytest

from data_pipeline.readers import IssueLog, SourceSpec, infer_format, read_source

pytestmark = pytest.mark.timeout(60)


def _read(spec: str) -> tuple[list, IssueLog]:
    issues = IssueLog()
    return list(read_source(SourceSpec.parse(spec), issues)), issues


def test_source_spec_parsing():
    s = SourceSpec.parse("wiki=/data/a:b/wiki.txt:wikitext")
    assert (s.name, s.path, s.format) == ("wiki", "/data/a:b/wiki.txt", "wikitext")
    assert SourceSpec.parse("c4=/x/c4.json.gz").format is None
    with pytest.raises(ValueError, match="NAME=PATH"):
        SourceSpec.parse("nonsense")
    assert infer_format(__import__("pathlib").Path("x.warc.wet.gz")) == "wet"


def test_jsonl_shapes_and_bad_lines(tmp_path):
    p = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"id": "dolma-1", "text": "dolma text", "metadata": {"url": "u"}}).encode(),
        json.dumps({"raw_content": "ccnet text", "url": "http://x", "digest": "sha1:1"}).encode(),
        json.dumps({"text": "redpajama text", "meta": {"url": "http://rp"}}).encode(),
        b'{"text": "broken',
        b'{"text": "bad \xff\xfe bytes"}',
        json.dumps({"text": "   "}).encode(),
        json.dumps({"title": "no text"}).encode(),
        json.dumps({"text": "last good"}).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    docs, issues = _read(f"s={p}")
    assert [d.id for d in docs] == ["dolma-1", "http://x", "http://rp", "mixed.jsonl:8"]
    assert [d.line for d in docs] == [1, 2, 3, 8]
    assert issues.counts == {"malformed_json": 1, "non_utf8": 1, "empty_document": 1, "missing_text": 1}
    where = {(i.kind, i.line) for i in issues.issues}
    assert where == {("malformed_json", 4), ("non_utf8", 5), ("empty_document", 6), ("missing_text", 7)}
    assert all(i.file == str(p) for i in issues.issues)


def test_corrupt_gzip_is_reported_with_file_and_line(tmp_path):
    good = b"".join(json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(2000))
    blob = gzip.compress(good)
    p = tmp_path / "trunc.jsonl.gz"
    p.write_bytes(blob[: len(blob) // 2])  # truncated member
    q = tmp_path / "garbage.jsonl.gz"
    q.write_bytes(blob[:40] + b"\x00" * 200 + blob[240:])  # corrupted deflate data
    docs, issues = _read(f"s={tmp_path}")
    assert issues.counts["corrupt_compressed_stream"] == 2
    files = {i.file for i in issues.issues}
    assert files == {str(p), str(q)}
    trunc = next(i for i in issues.issues if i.file == str(p))
    assert trunc.line > 1 and len([d for d in docs if d.file == str(p)]) == trunc.line - 1


def test_wet_conversion_records(tmp_path):
    def rec(kind: str, uri: str, body: bytes) -> bytes:
        head = f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: {uri}\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body + b"\r\n\r\n"

    data = rec("warcinfo", "", b"software: x") + rec("conversion", "http://a", b"Page A text\nline 2")
    data += rec("conversion", "http://b", b"") + rec("conversion", "http://c", b"Page C")
    p = tmp_path / "x.warc.wet.gz"
    with gzip.open(p, "wb") as f:  # one gzip member per record, as Common Crawl does
        f.write(data)
    docs, issues = _read(f"cc={p}")
    assert [(d.id, d.text) for d in docs] == [("http://a", "Page A text\nline 2"), ("http://c", "Page C")]
    assert issues.counts == {"empty_document": 1}


def test_wikitext_articles(shared_data):
    docs, issues = _read(f"wiki={shared_data / 'wikipedia' / 'wikitext-2-raw.test.txt'}")
    assert len(docs) > 50 and docs[0].id == "Robert Boulter" and docs[0].line == 1
    assert all("\r" not in d.text for d in docs)
    assert all(d.text.lstrip().startswith("= ") for d in docs)


def test_real_samples_keep_source_and_id(shared_data):
    docs, _ = _read(f"c4={shared_data / 'c4'}")
    assert len(docs) == 1000 and docs[0].id.startswith("http") and docs[0].source == "c4"
    cc, issues = _read(f"cc={shared_data / 'commoncrawl'}")
    n_lines = sum(1 for f in (shared_data / "commoncrawl").glob("*.gz") for _ in gzip.open(f))
    assert len(cc) + sum(issues.counts.values()) == n_lines  # every record is a document or a counted issue
    assert {d.file.rsplit("/", 1)[1] for d in cc} >= {"000.json.gz", "cc_en_head-0091.jsonl.gz"}


def test_hf_datasets_local_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"row {i}", "id": str(i)}) for i in range(5)) + "\n")
    docs, _ = _read(f"h={p}:hf")
    assert [d.text for d in docs] == [f"row {i}" for i in range(5)]
