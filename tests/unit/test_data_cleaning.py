"""Cleaning filters: normalisation, exact / line / near dedup (planted duplicates), heuristics, language id.

    pytest tests/unit/test_data_cleaning.py
"""

from __future__ import annotations

import gzip
import json
import random

import pytest

from data_pipeline.cleaning import Cleaner, CleaningConfig, heuristic_reason, normalize_text
from data_pipeline.langid import LanguageFilter
from data_pipeline.minhash import MinHashDeduper, jaccard
from data_pipeline.readers import Document

pytestmark = pytest.mark.timeout(60)

ONLY_DEDUP = dict(normalize=True, exact_dedup=True, line_dedup=False, heuristics=False, langid=False, near_dedup=True)


def _doc(text: str, i: int, source: str = "t") -> Document:
    return Document(text=text, source=source, id=f"d{i}", file="mem", line=i + 1)


def _perturb(text: str, rng: random.Random, n_changes: int) -> str:
    words = text.split(" ")
    for pos in rng.sample(range(len(words)), n_changes):
        words[pos] = rng.choice(["apple", "zebra", "quantum", "violet", "harbor", "meadow"])
    return " ".join(words)


def test_normalize_is_nfc_lf_and_idempotent():
    s = "Cafe\u0301\r\nline two\rthree\u200b\x07"
    n = normalize_text(s)
    assert n == "Caf\u00e9\nline two\nthree"
    assert normalize_text(n) == n


def test_line_dedup_removes_repeated_boilerplate_and_reports():
    cfg = CleaningConfig(**{**ONLY_DEDUP, "near_dedup": False, "line_dedup": True})
    c = Cleaner(cfg)
    a = c.process(_doc("Home | About | Contact\nThe first article text is here.", 0))
    b = c.process(_doc("HOME | about | contact!\nA second, different article body.", 1))
    assert a is not None and "Home" in a.text
    assert b is not None and b.text == "A second, different article body."
    st = c.report()["by_source"]["t"]["line_dedup"]
    assert st["docs_modified"] == 1 and st["bytes_removed_in_kept"] > 0


def test_exact_dedup_counts_bytes_and_reason():
    c = Cleaner(CleaningConfig(**{**ONLY_DEDUP, "near_dedup": False}))
    assert c.process(_doc("same text here", 0)) is not None
    assert c.process(_doc("same text here\r\n", 1)) is None  # equal after normalisation
    st = c.report()["by_source"]["t"]["exact_dedup"]
    assert st["docs_dropped"] == 1 and st["reasons"] == {"exact_duplicate": 1} and st["bytes_dropped"] > 0


def test_heuristics_catch_repetition_and_short_docs():
    cfg = CleaningConfig()
    assert heuristic_reason("too short to keep", cfg) == "too_few_words"
    spam = " ".join(["buy cheap watches now"] * 40)
    assert heuristic_reason(spam, cfg) is not None
    good = ("The committee met on Tuesday to review the budget for the coming year. Members discussed the "
            "costs of maintaining the old library building, which has needed repairs since the storm. "
            "Several residents spoke in favour of a new community centre near the river, while others "
            "asked for more funding for the schools and the public park on the east side of town.")
    assert heuristic_reason(good, cfg) is None


def test_langid_keeps_english_only():
    lf = LanguageFilter(keep=("en",))
    assert lf.classify("The weather is lovely today and we are going to the beach.")[2]
    lang, _, keep = lf.classify("Le temps est magnifique aujourd'hui et nous allons à la plage avec les enfants.")
    assert lang == "fr" and not keep


def test_minhash_signature_is_deterministic_and_estimates_jaccard():
    rng = random.Random(0)
    words = [rng.choice("alpha beta gamma delta epsilon zeta eta theta iota kappa".split()) + str(i % 50)
             for i in range(300)]
    a = " ".join(words)
    b = _perturb(a, rng, 6)
    d1, d2 = MinHashDeduper(num_perm=256, seed=7), MinHashDeduper(num_perm=256, seed=7)
    assert (d1.signature(a) == d2.signature(a)).all()
    est = float((d1.signature(a) == d1.signature(b)).mean())
    assert abs(est - jaccard(a, b)) < 0.1


def test_planted_duplicates_removed_distinct_survive(shared_data):
    """Exact and near-duplicate (3 words changed) copies planted in real C4 documents."""
    path = shared_data / "c4" / "c4-sample.00000-of-00001.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    rng = random.Random(1234)
    eligible = [i for i, t in enumerate(texts) if len(t.split(" ")) >= 150]
    near_src = rng.sample(eligible, 100)
    exact_src = rng.sample(range(len(texts)), 50)
    planted = [(_perturb(texts[i], rng, 3), "near") for i in near_src] + [(texts[i], "exact") for i in exact_src]
    rng.shuffle(planted)
    c = Cleaner(CleaningConfig(**ONLY_DEDUP, near_dup_threshold=0.7))
    kept_orig = sum(c.process(_doc(t, i)) is not None for i, t in enumerate(texts))
    kept_planted = {"near": 0, "exact": 0}
    for j, (t, kind) in enumerate(planted):
        kept_planted[kind] += c.process(_doc(t, len(texts) + j)) is not None
    near_recall = 1 - kept_planted["near"] / 100
    assert kept_planted["exact"] == 0
    assert near_recall >= 0.95, near_recall
    fpr = 1 - kept_orig / len(texts)  # originals are the distinct documents; none should be dropped
    assert fpr <= 0.01, fpr
    rep = c.report()["by_source"]["t"]
    assert rep["exact_dedup"]["docs_dropped"] >= 50 and rep["near_dedup"]["docs_dropped"] >= 95
