"""Tokenized shards: EOS per document, dtype, manifest, resume of an interrupted prepare, integrity checks,
tokenizer refusal.

    pytest tests/unit/test_data_shards.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.cleaning import CleaningConfig
from data_pipeline.loader import check_tokenizer_matches
from data_pipeline.readers import SourceSpec
from data_pipeline.shard_io import ShardError, mcore_datasets, validate_indexed
from data_pipeline.tokenize_shards import PrepareConfig, PrepareInterrupted, file_sha256, prepare
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tok512(shared_data) -> Path:
    return require_file(shared_data / "checkpoints" / "stories260K" / "tok512.model")


def _corpus(tmp: Path, n: int = 60) -> Path:
    d = tmp / "raw"
    d.mkdir()
    rows = [{"id": f"doc{i}", "text": f"Once upon a time there was a cat number {i}. " * (1 + i % 5)} for i in range(n)]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: n // 2]))
    (d / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n // 2 :]))
    return d


def _cfg(raw: Path, tok: Path, out: Path, workers: int = 2) -> PrepareConfig:
    return PrepareConfig(sources=[SourceSpec.parse(f"s={raw}")], tokenizer=tok, output=out, workers=workers,
                         shard_docs=7, cleaning=CleaningConfig.disabled(), progress=False)


def _docs(prefix: Path) -> list[list[int]]:
    ds = mcore_datasets().IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_prepare_writes_eos_terminated_docs_and_manifest(tmp_path, tok512):
    from model.tokenizer import load_tokenizer

    raw = _corpus(tmp_path)
    m = prepare(_cfg(raw, tok512, tmp_path / "out"))
    tok = load_tokenizer(tok512)
    docs = _docs(tmp_path / "out" / "s")
    assert len(docs) == 60 and m["sources"]["s"]["documents"] == 60
    rows = [json.loads(x) for f in ("a.jsonl", "b.jsonl") for x in (raw / f).read_text().splitlines()]
    for d, r in zip(docs, rows):
        assert d[-1] == tok.eos_id and d[:-1] == tok.encode(r["text"])
    assert m["dtype"] == "uint16" and m["tokenizer"]["sha256"] == file_sha256(tok512)
    assert {f["sha256"] for f in m["sources"]["s"]["files"]} == {file_sha256(raw / "a.jsonl"), file_sha256(raw / "b.jsonl")}
    assert m["sources"]["s"]["tokens"] == sum(map(len, docs))
    side = [json.loads(x) for x in (tmp_path / "out" / "s.docs.jsonl").read_text().splitlines()]
    assert [s["id"] for s in side] == [r["id"] for r in rows]
    assert prepare(_cfg(raw, tok512, tmp_path / "out")) == m  # finished: a re-run is a no-op


def test_interrupted_prepare_resumes_without_loss_or_duplication(tmp_path, tok512):
    raw = _corpus(tmp_path)
    ref = prepare(_cfg(raw, tok512, tmp_path / "ref", workers=0))
    with pytest.raises(PrepareInterrupted):
        prepare(_cfg(raw, tok512, tmp_path / "out"), stop_after_shards=3)
    progress = (tmp_path / "out" / "shards" / "progress.jsonl").read_text().splitlines()
    assert 3 <= len(progress) < 9
    m = prepare(_cfg(raw, tok512, tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["shards"]["skipped_already_done"] == len(progress)
    assert report["shards"]["tokenized_this_run"] == 9 - len(progress)
    assert _docs(tmp_path / "out" / "s") == _docs(tmp_path / "ref" / "s")
    assert m["sources"]["s"]["documents"] == ref["sources"]["s"]["documents"] == 60


def test_resume_with_changed_settings_is_refused(tmp_path, tok512):
    raw = _corpus(tmp_path)
    with pytest.raises(PrepareInterrupted):
        prepare(_cfg(raw, tok512, tmp_path / "out", workers=0), stop_after_shards=1)
    cfg = _cfg(raw, tok512, tmp_path / "out", workers=0)
    cfg.shard_docs = 5
    with pytest.raises(ValueError, match="shard_docs"):
        prepare(cfg)


def test_truncated_or_mismatched_files_fail_at_open_naming_the_file(tmp_path, tok512):
    raw = _corpus(tmp_path)
    prepare(_cfg(raw, tok512, tmp_path / "out", workers=0))
    prefix = tmp_path / "out" / "s"
    assert validate_indexed(prefix)["documents"] == 60
    b = Path(f"{prefix}.bin")
    data = b.read_bytes()
    b.write_bytes(data[:-10])
    with pytest.raises(ShardError, match=r"s\.bin.*truncated"):
        validate_indexed(prefix)
    b.write_bytes(data)
    idx = Path(f"{prefix}.idx")
    full = idx.read_bytes()
    idx.write_bytes(full[:50])
    with pytest.raises(ShardError, match=r"s\.idx.*truncated"):
        validate_indexed(prefix)
    idx.write_bytes(full)
    with pytest.raises(ShardError, match="manifest.json says 61"):
        validate_indexed(prefix, expect_docs=61)
    from data_pipeline.loader import build_pretrain_datasets

    b.write_bytes(data + b"\x00\x00")
    with pytest.raises(ShardError, match=str(b)):
        build_pretrain_datasets(data_dir_or_blend=tmp_path / "out", seq_len=16, seed=0, split="80,10,10",
                                num_samples=(10, 1, 1), tokenizer_info={"vocab_size": 512, "eod": 2}, cache_dir=None)


def test_tokenizer_mismatch_refused_before_training(tmp_path, tok512, shared_data):
    from model.tokenizer import load_tokenizer

    raw = _corpus(tmp_path, n=10)
    prepare(_cfg(raw, tok512, tmp_path / "out", workers=0))
    tok = load_tokenizer(tok512)
    check_tokenizer_matches(tmp_path / "out", tok, 512)
    with pytest.raises(ValueError, match="model config's vocab_size 32000"):
        check_tokenizer_matches(tmp_path / "out", tok, 32000)
    llama2 = require_file(shared_data / "tokenizers" / "llama2" / "tokenizer.model")
    with pytest.raises(ValueError, match="differs from the tokenizer the data"):
        check_tokenizer_matches(tmp_path / "out", load_tokenizer(llama2), 32000)
    assert np.dtype(json.loads((tmp_path / "out" / "manifest.json").read_text())["dtype"]) == np.uint16


def test_streaming_merge_equals_megatron_add_index(tmp_path):
    """``merge_indexed`` (no per-document lists) writes the bytes megatron's builder + ``add_index`` write."""
    import torch

    from data_pipeline.shard_io import merge_indexed

    mc, rng = mcore_datasets(), np.random.default_rng(0)
    prefixes = []
    for k, n_docs in enumerate((5, 0, 7)):
        p = tmp_path / f"part{k}"
        b = mc.IndexedDatasetBuilder(f"{p}.bin", dtype=np.uint16)
        for _ in range(n_docs):
            b.add_item(torch.from_numpy(rng.integers(0, 500, rng.integers(1, 40)).astype(np.int32)))
            b.end_document()
        b.finalize(f"{p}.idx")
        prefixes.append(p)
    ref = mc.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in prefixes:
        ref.add_index(str(p))
    ref.finalize(str(tmp_path / "ref.idx"))
    assert merge_indexed(prefixes, tmp_path / "ours") == {"documents": 12, "tokens": validate_indexed(
        tmp_path / "ref")["tokens"], "dtype": "uint16"}
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
