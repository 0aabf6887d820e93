"""Both prepare engines on the real samples (Common Crawl, C4, Wikipedia) with planted duplicates; a datatrove
run killed mid-stage and rerun.

    pytest tests/e2e/test_data_engines.py        # ~3 min on 2 cores: 5 prepare runs

Planted after the real sources (so the originals come first in stream order): 50 exact copies and 100 near
copies (3 words changed, documents of >= 150 words) of C4 documents that the local engine keeps. Acceptance:
the datatrove engine (local executor, 2 tasks) writes the same documents, token-identical shards and the same
per-filter report as the local engine; every exact copy and >= 95% of the near copies are removed; no original
is lost (C4's output is unchanged by the plants). A datatrove run whose task 1 is SIGKILLed mid-pass (with its
whole process group: a node lost), rerun with the same command, ends with the uninterrupted run's output.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require_file

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
pytest.importorskip("datatrove", reason="datatrove is not installed (pip install -e '.[data]')")

SOURCES = ("cc", "c4", "wiki")


def _perturb(text: str, rng: random.Random, n: int) -> str:
    words = text.split(" ")
    for pos in rng.sample(range(len(words)), n):
        words[pos] = rng.choice(["apple", "zebra", "quantum", "violet", "harbor", "meadow"])
    return " ".join(words)


def _prepare(args: list[str], out: Path, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_pipeline", "prepare", *args, "--output", str(out)]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, start_new_session=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", **(env or {})})


def _ids(out: Path, source: str) -> list[str]:
    return [json.loads(line)["id"] for line in (out / f"{source}.docs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    tok = require_file(shared_data / "tokenizers" / "llama2" / "tokenizer.model")
    root = tmp_path_factory.mktemp("engines")
    base = ["--source", f"cc={shared_data / 'commoncrawl'}", "--source", f"c4={shared_data / 'c4'}",
            "--source", f"wiki={shared_data / 'wikipedia' / 'wikitext-2-raw.test.txt'}:wikitext",
            "--tokenizer", str(tok), "--workers", "2"]
    r = _prepare(base, root / "plain")
    assert r.returncode == 0, r.stderr[-3000:]
    kept = set(_ids(root / "plain", "c4"))
    with gzip.open(shared_data / "c4" / "c4-sample.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
        c4 = [json.loads(line) for line in f]
    kept_docs = [d for d in c4 if d["url"] in kept]
    rng = random.Random(2024)
    near_src = rng.sample([d for d in kept_docs if len(d["text"].split(" ")) >= 150], 100)
    planted = ([{"id": f"exact-{i}", "text": d["text"]} for i, d in enumerate(rng.sample(kept_docs, 50))] +
               [{"id": f"near-{i}", "text": _perturb(d["text"], rng, 3)} for i, d in enumerate(near_src)])
    rng.shuffle(planted)
    (root / "planted").mkdir()
    with open(root / "planted" / "copies.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in planted)
    args = [*base, "--source", f"planted={root / 'planted'}"]
    for name, extra in (("local", []), ("dt", ["--engine", "datatrove", "--tasks", "2"])):
        r = _prepare([*args, *extra], root / name)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    return {"root": root, "args": args, "kept_c4": kept}


def test_datatrove_engine_keeps_the_same_documents_token_identical(runs):
    local, dt = runs["root"] / "local", runs["root"] / "dt"
    for s in (*SOURCES, "planted"):
        for ext in ("bin", "idx", "docs.jsonl"):
            assert (local / f"{s}.{ext}").read_bytes() == (dt / f"{s}.{ext}").read_bytes(), (s, ext)
    rl, rd = (json.loads((d / "report.json").read_text()) for d in (local, dt))
    assert rl["cleaning"]["by_source"] == rd["cleaning"]["by_source"]
    assert rl["documents_read"] == rd["documents_read"] and rl["read_issues"] == rd["read_issues"]
    assert rd["engine"]["tasks"] == 2 and "minhash_cluster" in rd["engine"]["stages"]
    ml, md = (json.loads((d / "manifest.json").read_text()) for d in (local, dt))
    assert ml["totals"] == md["totals"] and md["complete"]


def test_planted_copies_removed_and_no_original_lost(runs):
    dt = runs["root"] / "dt"
    survivors = _ids(dt, "planted") if (dt / "planted.docs.jsonl").exists() else []
    assert not [i for i in survivors if i.startswith("exact-")]
    near_kept = [i for i in survivors if i.startswith("near-")]
    assert 1 - len(near_kept) / 100 >= 0.95, near_kept
    assert _ids(dt, "c4") == _ids(runs["root"] / "plain", "c4")  # every original still there, in order
    assert (dt / "c4.bin").read_bytes() == (runs["root"] / "plain" / "c4.bin").read_bytes()


def test_task_killed_mid_stage_then_rerun_equals_uninterrupted_run(runs):
    out, marker = runs["root"] / "killed", runs["root"] / "kill.marker"
    args = [*runs["args"], "--engine", "datatrove", "--tasks", "2"]
    r = _prepare(args, out, env={"LLAMA_DT_TEST_KILL": f"pass4:1:50:{marker}"})
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])  # SIGKILL: the run died with its task
    assert marker.exists() and not (out / "manifest.json").exists()
    assert not (out / "dt" / "logs" / "07_pass4" / "completions" / "00001").exists()
    r = _prepare(args, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Skipping 2 already completed tasks" in r.stderr or "all 2 tasks have already been completed" in r.stderr
    for s in (*SOURCES, "planted"):
        for ext in ("bin", "idx", "docs.jsonl"):
            assert (out / f"{s}.{ext}").read_bytes() == (runs["root"] / "dt" / f"{s}.{ext}").read_bytes(), (s, ext)
    a, b = (json.loads((d / "report.json").read_text()) for d in (out, runs["root"] / "dt"))
    assert a["cleaning"] == b["cleaning"] and a["read_issues"] == b["read_issues"]
