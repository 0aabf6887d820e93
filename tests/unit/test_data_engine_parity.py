"""Both prepare engines on the same small input: identical shards and reports; bad input fails by name.

    pytest tests/unit/test_data_engine_parity.py

The datatrove engine runs in this process (``workers=1``: datatrove's local executor runs each task in a
loop), over 3 tasks, with planted exact, near and line duplicates spread across the tasks' input files, a
small line-dedup bucket and 2 allowed line repeats, so that every cross-task rule is exercised.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from data_pipeline.__main__ import main
from data_pipeline.cleaning import CleaningConfig
from data_pipeline.readers import SourceSpec
from data_pipeline.tokenize_shards import PrepareConfig, prepare
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(240)

dt_engine = pytest.importorskip("data_pipeline.dt.engine", reason="datatrove is not installed (pip install -e '.[data]')")


def _perturb(text: str, rng: random.Random, n: int) -> str:
    words = text.split(" ")
    for pos in rng.sample(range(len(words)), n):
        words[pos] = rng.choice(["apple", "zebra", "quantum", "violet", "harbor", "meadow"])
    return " ".join(words)


def _write(path: Path, recs: list[dict | str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """Three files of real C4 documents with planted duplicates, and the tokenizer."""
    tok = require_file(shared_data / "checkpoints" / "stories260K" / "tok512.model")
    with gzip.open(shared_data / "c4" / "c4-sample.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:240]
    rng = random.Random(7)
    boiler = "Subscribe to our newsletter for weekly updates!"
    docs = [{"id": f"c4-{i}", "text": (t + "\n" + boiler) if i % 3 == 0 else t} for i, t in enumerate(texts)]
    long = [i for i, t in enumerate(texts) if len(t.split(" ")) >= 150]
    planted = ([{"id": f"exact-{i}", "text": docs[i]["text"]} for i in rng.sample(range(240), 15)] +
               [{"id": f"near-{i}", "text": _perturb(texts[i], rng, 3)} for i in rng.sample(long, 15)])
    rng.shuffle(planted)
    d = tmp_path_factory.mktemp("engines")
    _write(d / "a.jsonl.gz", docs[:100] + ["{not json"])
    _write(d / "b.jsonl.gz", docs[100:240] + planted[:10])
    _write(d / "c.jsonl.gz", planted[10:] + [{"id": "fr", "text": "Le chat est sur la table et il dort " * 5}])
    return d, tok


def _config(d: Path, tok: Path, out: Path, **cleaning) -> PrepareConfig:
    c = CleaningConfig(line_dedup_bucket_docs=90, max_line_repeats=2, **cleaning)
    return PrepareConfig(sources=[SourceSpec.parse(f"web={d}")], tokenizer=tok, output=out, workers=0,
                         shard_docs=64, cleaning=c, progress=False)


def _same_output(a: Path, b: Path, sources: list[str]) -> None:
    for s in sources:
        for ext in ("bin", "idx", "docs.jsonl"):
            assert (a / f"{s}.{ext}").read_bytes() == (b / f"{s}.{ext}").read_bytes(), (s, ext)
    ra, rb = (json.loads((x / "report.json").read_text()) for x in (a, b))
    assert ra["cleaning"]["by_source"] == rb["cleaning"]["by_source"]
    assert ra["documents_read"] == rb["documents_read"] and ra["read_issues"]["counts"] == rb["read_issues"]["counts"]


def test_datatrove_engine_equals_local_engine(corpus, tmp_path, monkeypatch):
    d, tok = corpus
    # line dedup signatures in runs of 97 records: many sorted runs per task, documents split across runs
    monkeypatch.setattr("data_pipeline.dt.line_dedup.RUN_RECORDS", 97)
    local = prepare(_config(d, tok, tmp_path / "local"))
    dt = dt_engine.prepare_datatrove(_config(d, tok, tmp_path / "dt"),
                                     dt_engine.DatatroveConfig(tasks=3, workers=1))
    _same_output(tmp_path / "local", tmp_path / "dt", ["web"])
    assert dt["sources"]["web"]["documents"] == local["sources"]["web"]["documents"] > 150
    rep = json.loads((tmp_path / "dt" / "report.json").read_text())["cleaning"]["by_source"]["web"]
    # every rule did something, so the equality above covers them all
    assert rep["exact_dedup"]["docs_dropped"] >= 15 and rep["near_dedup"]["docs_dropped"] >= 14
    assert rep["line_dedup"]["docs_modified"] > 0 and rep["langid"]["docs_dropped"] >= 1
    plan = json.loads((tmp_path / "dt" / "dt" / "plan.json").read_text())
    assert [f["rank"] for f in plan["files"]] == [0, 1, 2]  # one file per task: every dedup crosses tasks
    ids = {json.loads(x)["id"] for x in (tmp_path / "dt" / "web.docs.jsonl").read_text().splitlines()}
    assert not any(i.startswith("exact-") for i in ids)
    assert not (tmp_path / "dt" / "dt" / "scratch").exists()  # scratch removed after success
    stages = json.loads((tmp_path / "dt" / "report.json").read_text())["engine"]["stages"]
    assert stages["pass4"]["tasks"] == 3 * dt_engine.SLICES_PER_TASK == len(stages["pass4"]["task_cpu_s"])
    again = dt_engine.prepare_datatrove(_config(d, tok, tmp_path / "dt"), dt_engine.DatatroveConfig(tasks=3, workers=1))
    assert again == dt  # finished: a rerun is a no-op
    with pytest.raises(ValueError, match="different engine"):
        dt_engine.prepare_datatrove(_config(d, tok, tmp_path / "dt"), dt_engine.DatatroveConfig(tasks=2, workers=1))


def test_last_pass_slices_are_contiguous_equal_bytes_and_cover_every_document(tmp_path):
    """``SliceJsonlReader`` (the last pass's reader): for any number of slices, the slices in order give every
    document of the previous pass's ``<rank>.jsonl`` files exactly once, in stream order (a task that wrote no
    file included), each slice within one document of an equal share of the bytes."""
    from data_pipeline.dt.steps import SliceJsonlReader

    rng = random.Random(3)
    sizes = {0: 7, 1: 0, 2: 40, 3: 1}  # task 1 wrote nothing; task 3 one document
    docs, total = [], 0
    for rank, n in sizes.items():
        if n == 0:
            continue
        with open(tmp_path / f"{rank:05d}.jsonl", "wb") as f:
            for i in range(n):
                line = json.dumps({"text": "w " * rng.randrange(1, 400), "id": f"{rank}-{i}",
                                   "metadata": {"task": rank, "line_doc": i}}).encode() + b"\n"
                f.write(line)
                docs.append((f"{rank}-{i}", len(line)))
                total += len(line)
    longest = max(n for _, n in docs)
    for world in (1, 2, 3, 8, 60):
        got = [[d.id for d in SliceJsonlReader(str(tmp_path), tasks=len(sizes)).run(rank=r, world_size=world)]
               for r in range(world)]
        assert [i for part in got for i in part] == [i for i, _ in docs], world
        size = dict(docs)
        for part in got:
            assert abs(sum(size[i] for i in part) - total / world) <= longest, (world, part)


def test_tokenizer_adapter_gives_our_ids(shared_data):
    from data_pipeline.dt.steps import OurTokenizer
    from model.tokenizer import load_tokenizer

    path = require_file(shared_data / "tokenizers" / "llama2" / "tokenizer.model")
    texts = ["Hello   world,  two  spaces", "literal </s> stays text", "naïve café\nnew line", ""]
    ours = load_tokenizer(path)
    got = [e.ids for e in OurTokenizer(str(path)).encode_batch(texts)]
    assert got == [ours.encode(t) + [ours.eos_id] for t in texts]
    assert OurTokenizer(str(path)).get_vocab_size() == 32000


@pytest.mark.parametrize("engine", ["local", "datatrove"])
def test_source_with_only_bad_records_fails_by_name(tmp_path, shared_data, engine, capsys):
    tok = require_file(shared_data / "checkpoints" / "stories260K" / "tok512.model")
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"document number {i} " + "with plenty of ordinary words " * 8})
                              for i in range(5)) + "\n{broken\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": \n{"nope": 1}\n[1, 2]\n')
    broken_gz = tmp_path / "broken.jsonl.gz"
    broken_gz.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(200)))
    out = tmp_path / "out"
    argv = ["prepare", "--engine", engine, "--workers", "1", "--tasks", "2", "--tokenizer", str(tok), "--output",
            str(out), "--source", f"good={good}", "--source", f"bad={bad}", "--source", f"gz={broken_gz}",
            "--keep-langs", "", "--no-clean"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "source 'bad': no usable document (3 malformed" in err and "source 'gz'" in err
    assert "corrupt_compressed_stream" in err and str(out / "report.json") in err
    assert "source 'good'" not in err
    assert not (out / "manifest.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["read_issues"]["by_source"] == {"bad": 3, "good": 1, "gz": 1}


@pytest.mark.parametrize("engine", ["local", "datatrove"])
def test_console_summary_names_malformed_records_and_the_list(tmp_path, shared_data, engine, capsys):
    tok = require_file(shared_data / "checkpoints" / "stories260K" / "tok512.model")
    src = tmp_path / "src.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"text {i} " * 30}) for i in range(4)) + '\n{"text": 3}\nnot json\n')
    out = tmp_path / "out"
    assert main(["prepare", "--engine", engine, "--workers", "1", "--tasks", "1", "--tokenizer", str(tok),
                 "--output", str(out), "--source", f"s={src}", "--no-clean"]) == 0
    text = capsys.readouterr().out
    assert "malformed or unusable records: 2 (malformed_json=1, missing_text=1; by source: s=2)" in text
    assert f"listed with file and line in {out / 'report.json'}" in text and f"{src}:6: malformed_json" in text
