"""End to end on the real samples (Wikipedia, C4, Common Crawl): CLI prepare -> 67/15/18 blend sampled
within 1% over 10k sequences -> inspect decodes a sampled document equal to its source text.

    pytest tests/e2e/test_data_pipeline.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.__main__ import inspect_dir, main
from data_pipeline.blend import MixtureSpec, epochs_report, llama1_preset
from data_pipeline.loader import build_pretrain_datasets
from tests.conftest import require_file

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    tok = require_file(shared_data / "checkpoints" / "stories260K" / "tok512.model")
    out = tmp_path_factory.mktemp("e2e") / "data"
    rc = main(["prepare", "--source", f"cc={shared_data / 'commoncrawl'}", "--source", f"c4={shared_data / 'c4'}",
               "--source", f"wiki={shared_data / 'wikipedia' / 'wikitext-2-raw.test.txt'}:wikitext",
               "--tokenizer", str(tok), "--output", str(out), "--workers", "2", "--shard-docs", "300",
               "--line-dedup-sources", "cc,c4"])
    assert rc == 0
    return out


def test_blend_fractions_within_one_percent(prepared):
    spec = MixtureSpec.from_weights(prepared, {"cc": 0.67, "c4": 0.15, "wiki": 0.18})
    train, valid, _ = build_pretrain_datasets(data_dir_or_blend=spec, seq_len=128, seed=1234, split="90,5,5",
                                              num_samples=(10_000, 200, 0), tokenizer_info={"vocab_size": 512, "eod": 2},
                                              cache_dir=None)
    assert len(train) >= 10_000 and valid is not None
    counts = np.zeros(3)
    for i in range(10_000):
        counts[int(train[i]["dataset_id"])] += 1
    frac = counts / counts.sum()
    assert np.all(np.abs(frac - np.array([0.67, 0.15, 0.18])) <= 0.01), frac
    rows = {r["source"]: r for r in epochs_report(spec, 10_000 * 128)}
    assert rows["cc"]["epochs"] == pytest.approx(0.67 * 10_000 * 128 / spec.entries[0].tokens)


def test_llama1_preset_renormalises_missing_sources(prepared):
    spec = llama1_preset({"commoncrawl": prepared / "cc", "c4": prepared / "c4", "wikipedia": prepared / "wiki"})
    w = spec.normalized()
    assert w["commoncrawl"] / w["c4"] == pytest.approx(67 / 15) and "github" in spec.notes[0]
    assert spec.entries[0].tokens is not None


def test_inspect_decodes_the_source_text(prepared, capsys):
    m = json.loads((prepared / "manifest.json").read_text())
    assert all(m["sources"][s]["documents"] > 0 for s in ("cc", "c4", "wiki"))
    assert all(len(f["sha256"]) == 64 for s in m["sources"].values() for f in s["files"])
    for source, doc in (("c4", 17), ("wiki", 3), ("cc", 5)):
        info = inspect_dir(prepared, source=source, doc=doc)
        assert info["sample"]["ends_with_eos"]
        assert info["sample"]["equals_source_text"], (source, info["sample"]["id"])
    assert main(["inspect", str(prepared)]) == 0
    out = capsys.readouterr().out
    assert "equals source text: True" in out and "near_dedup" in out and "empty_document" in out
