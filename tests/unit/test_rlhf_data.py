"""Readers, HH-RLHF parsing, hash split and RM mixtures of rlhf/data.py (``pytest tests/unit/test_rlhf_data.py``).

Malformed input is built in tmp files; the real Anthropic HH-RLHF test splits are read from the shared data
directory (skipped when absent) and never copied into the repository.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from rlhf import losses
from rlhf.data import (
    RATINGS,
    Dialogue,
    PreferencePair,
    RecordError,
    helpfulness_rm_mixture,
    parse_hh_rlhf,
    rating_buckets,
    read_dialogues_jsonl,
    read_hh_rlhf,
    read_preferences_jsonl,
    safety_rm_mixture,
    split_by_hash,
)
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(60)


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    raw = b"".join(
        (json.dumps(x).encode() if isinstance(x, dict) else x.encode() if isinstance(x, str) else x) + b"\n"
        for x in lines
    )
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def pair(i: int, **extra: object) -> dict:
    return {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}", **extra}


# ----------------------------------------------------------------------------------------------- preferences


def test_preferences_counts_every_malformed_line(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "prefs.jsonl",
        [
            pair(1),  # 1 good
            '{"prompt": "q", "chosen": ',  # 2 bad JSON
            {"prompt": "q", "rejected": "r"},  # 3 missing chosen
            pair(4, prompt=[{"role": "bot", "content": "hi"}]),  # 4 bad role
            pair(5, rating="much_better"),  # 5 unknown rating
            pair(6, chosen="   "),  # 6 empty text
            b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # 7 latin-1 byte: invalid UTF-8
            pair(
                8,
                rating="Slightly better",
                is_safety=True,
                prompt=[
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and?"},
                ],
            ),  # 8 good
            "[1, 2]",  # 9 not an object
            pair(
                10, prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
            ),  # 10
            pair(11, chosen="same", rejected="same"),  # 11 identical
            pair(12, is_safety="yes"),  # 12 wrong type
        ],
    )
    records, report = read_preferences_jsonl(path)
    print(report)
    assert report.read == 12 and report.kept == 2
    assert report.read == report.kept + sum(report.skipped.values())
    expected = {
        "bad_json": [2],
        "missing_field": [3],
        "bad_role": [4],
        "unknown_rating": [5],
        "empty_text": [6],
        "invalid_utf8": [7],
        "not_an_object": [9],
        "bad_turn_order": [10],
        "identical_answers": [11],
        "bad_field_type": [12],
    }
    assert dict(report.skipped) == {reason: 1 for reason in expected}
    for reason, lines in expected.items():
        assert report.lines_for(reason) == lines, reason
    assert all(e.file == str(path) for e in report.examples)
    text = str(report)
    assert "read 12, kept 2" in text and f"{path}:5: unknown_rating" in text and "much_better" in text

    first, second = records
    assert first.prompt == [{"role": "user", "content": "question 1?"}] and first.rating is None
    assert not first.is_safety and first.id == "prefs.jsonl:1" and first.source == "prefs.jsonl"
    assert second.rating == "slightly_better" and second.is_safety and second.prompt[-1]["role"] == "user"
    safety_records, _ = read_preferences_jsonl(path, default_is_safety=True)
    assert safety_records[0].is_safety


def test_missing_file_raises_with_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_preferences_jsonl(tmp_path / "nope.jsonl")


def test_truncated_gzip_is_counted_not_raised(tmp_path: Path) -> None:
    full = write_lines(tmp_path / "full.jsonl.gz", [pair(i) for i in range(2000)])
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    records, report = read_preferences_jsonl(cut)
    print(report)
    assert report.skipped == Counter({"corrupt_gzip": 1})
    assert 0 < report.kept < 2000 and report.kept == len(records)
    assert report.lines_for("corrupt_gzip") == [report.kept + 1]
    # A good member followed by a corrupt one: the first member's lines are kept.
    good = gzip.compress(b"".join(json.dumps(pair(i)).encode() + b"\n" for i in range(3)))
    multi = tmp_path / "multi.jsonl.gz"
    multi.write_bytes(good + data[:200])
    records, report = read_preferences_jsonl(multi)
    assert [r.chosen for r in records[:3]] == ["good answer 0", "good answer 1", "good answer 2"]
    assert len(records) > 3 and report.skipped == Counter({"corrupt_gzip": 1})  # + readable part of member 2
    # Not gzip at all.
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"this is not gzip\n")
    records, report = read_preferences_jsonl(fake)
    assert records == [] and report.lines_for("corrupt_gzip") == [1]


# -------------------------------------------------------------------------------------------------- dialogues


def test_dialogues_reader(tmp_path: Path) -> None:
    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    path = write_lines(
        tmp_path / "dialogues.jsonl.gz",
        [
            {"messages": [user, bot], "date": "2023-07-18", "id": "d1"},  # 1 good
            {"messages": [{"role": "system", "content": "Speak French"}, user, bot]},  # 2 good, system lifted
            {"messages": [user, {"role": "robot", "content": "x"}]},  # 3 bad role
            {"messages": [bot, user]},  # 4 starts with assistant
            {"messages": [user, bot], "date": "18/07/2023"},  # 5 bad date
            {"system": "s"},  # 6 no messages
            {"messages": [user, {"role": "assistant", "content": ""}]},  # 7 empty
            {"messages": [user]},  # 8 ends with user
            "",  # 9 blank line
            {"messages": [user, {"role": "assistant"}]},  # 10 no content
        ],
    )
    records, report = read_dialogues_jsonl(path)
    print(report)
    assert report.read == 10 and report.kept == 2
    assert report.skipped == Counter(
        {
            "bad_role": 1,
            "bad_turn_order": 2,
            "bad_date": 1,
            "missing_field": 2,
            "empty_text": 1,
            "blank_line": 1,
        }
    )
    assert report.lines_for("bad_turn_order") == [4, 8] and report.lines_for("missing_field") == [6, 10]
    d1, d2 = records
    assert isinstance(d1, Dialogue) and d1.id == "d1" and d1.date == "2023-07-18" and d1.system is None
    assert d2.system == "Speak French" and d2.messages == [user, bot] and d2.id == "dialogues.jsonl.gz:2"
    prompts, report = read_dialogues_jsonl(path, require_final_assistant=False)
    assert report.kept == 3 and prompts[-1].messages == [user]


# ---------------------------------------------------------------------------------------------------- HH-RLHF


def test_parse_hh_rlhf_quirks() -> None:
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine."
    assert parse_hh_rlhf(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine."},
    ]
    # Leading/trailing whitespace, no blank line before the first marker.
    assert parse_hh_rlhf("  Human: a \n\nAssistant:  b  \n") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    # Doubled marker: merged and counted.
    repaired: Counter[str] = Counter()
    turns = parse_hh_rlhf("\n\nHuman: q\n\nAssistant: part 1\n\nAssistant: part 2", repaired=repaired)
    assert turns[-1] == {"role": "assistant", "content": "part 1\n\npart 2"}
    assert repaired == Counter({"hh_merged_doubled_assistant_marker": 1})
    # A marker inside a line is content.
    assert parse_hh_rlhf("\n\nHuman: q?\n\nAssistant: Human: no")[-1]["content"] == "Human: no"
    for bad, reason in [
        ("\n\nAssistant: hi", "hh_no_human_start"),
        ("just text", "hh_no_human_start"),
        ("\n\nHuman: q\n\nAssistant:", "empty_text"),
    ]:
        with pytest.raises(RecordError) as err:
            parse_hh_rlhf(bad)
        assert err.value.reason == reason


def test_read_hh_rlhf_skips_with_reasons(tmp_path: Path) -> None:
    base = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2"
    path = write_lines(
        tmp_path / "hh.jsonl",
        [
            {"chosen": base + "\n\nAssistant: good", "rejected": base + "\n\nAssistant: bad"},  # 1 good
            {"chosen": base + "\n\nAssistant: good", "rejected": "\n\nHuman: other\n\nAssistant: bad"},  # 2
            {"chosen": base + "\n\nAssistant: same", "rejected": base + "\n\nAssistant: same"},  # 3
            {"chosen": base, "rejected": base + "\n\nAssistant: bad"},  # 4 no final answer
            {"chosen": base + "\n\nAssistant: good"},  # 5 missing rejected
        ],
    )
    pairs, report = read_hh_rlhf(path, is_safety=True)
    assert report.kept == 1 and report.read == 5
    assert report.skipped == Counter(
        {"hh_prefix_mismatch": 1, "identical_answers": 1, "hh_no_final_answer": 1, "missing_field": 1}
    )
    (p,) = pairs
    assert p.chosen == "good" and p.rejected == "bad" and p.is_safety and p.rating is None
    assert [t["role"] for t in p.prompt] == ["user", "assistant", "user"]


@pytest.mark.parametrize("subset,is_safety", [("helpful-base", False), ("harmless-base", True)])
def test_real_hh_rlhf_test_split(shared_data: Path, subset: str, is_safety: bool) -> None:
    path = require_file(shared_data / "preferences" / "hh-rlhf" / subset / "test.jsonl.gz")
    pairs, report = read_hh_rlhf(path, is_safety=is_safety)
    print(f"\n{subset}: {report}")
    assert report.read > 2000 and report.kept_fraction >= 0.98
    assert report.read == report.kept + sum(report.skipped.values())
    for p in pairs:
        assert p.prompt and p.prompt[-1]["role"] == "user" and p.prompt[0]["role"] == "user"
        assert p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected
        assert p.is_safety is is_safety and p.source == f"hh-rlhf/{subset}"
    assert len({p.id for p in pairs}) == len(pairs)
    train, valid = split_by_hash(pairs, valid_fraction=0.1)
    assert 0.06 < len(valid) / len(pairs) < 0.14


# ------------------------------------------------------------------------------------------ split, mixtures


def make_pairs(n: int, *, source: str, is_safety: bool, prompts: int | None = None) -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt=[{"role": "user", "content": f"{source} prompt {i % (prompts or n)}"}],
            chosen=f"c{i}",
            rejected=f"r{i}",
            rating=None,
            is_safety=is_safety,
            source=source,
            id=f"{source}:{i}",
        )
        for i in range(n)
    ]


def test_split_by_hash_deterministic_disjoint_grouped() -> None:
    records = make_pairs(3000, source="h", is_safety=False, prompts=1000)  # 3 pairs per prompt
    train, valid = split_by_hash(records, valid_fraction=0.1)
    train2, valid2 = split_by_hash(list(records), valid_fraction=0.1)
    assert [r.id for r in train] == [r.id for r in train2] and [r.id for r in valid] == [r.id for r in valid2]
    ids_t, ids_v = {r.id for r in train}, {r.id for r in valid}
    assert not ids_t & ids_v and len(ids_t | ids_v) == 3000
    prompts_t = {r.prompt[0]["content"] for r in train}
    assert not prompts_t & {r.prompt[0]["content"] for r in valid}  # same prompt never straddles
    assert 0.07 < len(valid) / 3000 < 0.13
    other_train, _ = split_by_hash(records, valid_fraction=0.1, seed="another seed")
    assert {r.id for r in other_train} != ids_t
    # Growing the data set never moves existing records.
    grown_train, _ = split_by_hash(records + make_pairs(50, source="x", is_safety=False), valid_fraction=0.1)
    assert ids_t <= {r.id for r in grown_train}
    assert (
        split_by_hash(records, valid_fraction=0.0)[1] == []
        and split_by_hash(records, valid_fraction=1)[0] == []
    )
    dicts = [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}]
    assert sum(map(len, split_by_hash(dicts))) == 2


def test_rm_mixtures_proportions_and_determinism() -> None:
    helpful = make_pairs(100, source="helpful", is_safety=False)
    safety = make_pairs(300, source="safety", is_safety=True)
    mix, counts = helpfulness_rm_mixture(helpful, safety, seed=0)
    assert counts == {"helpful": 100, "safety": 100, "safety_requested": 100, "total": 200}
    assert Counter(p.source for p in mix) == {"helpful": 100, "safety": 100}
    assert len({p.id for p in mix}) == 200  # without replacement
    assert [p.id for p in helpfulness_rm_mixture(helpful, safety, seed=0)[0]] == [p.id for p in mix]
    assert [p.id for p in helpfulness_rm_mixture(helpful, safety, seed=1)[0]] != [p.id for p in mix]
    _, capped = helpfulness_rm_mixture(helpful, safety[:30], seed=0)
    assert capped["safety"] == 30 and capped["total"] == 130

    mix, counts = safety_rm_mixture(safety[:270], helpful, seed=0)
    assert counts == {"safety": 270, "helpful": 30, "helpful_requested": 30, "total": 300}
    assert sum(p.is_safety for p in mix) / len(mix) == pytest.approx(0.9)
    _, capped = safety_rm_mixture(safety, helpful[:10], seed=0)
    assert capped["helpful"] == 10 and capped["helpful_requested"] == 33
    with pytest.raises(ValueError, match="safety_fraction"):
        safety_rm_mixture(safety, helpful, seed=0, safety_fraction=0.0)


def test_rating_buckets_and_shared_rating_names() -> None:
    assert RATINGS == losses.RATINGS and set(RATINGS) == set(losses.MARGIN_TABLES["small"])
    ratings = ["better", None, "significantly_better", "better", "unsure"]
    assert rating_buckets(ratings) == {
        "significantly_better": [2],
        "better": [0, 3],
        "unsure": [4],
        "unrated": [1],
    }
    recs = make_pairs(2, source="s", is_safety=False)
    recs[1].rating = "slightly_better"
    assert rating_buckets(recs) == {"slightly_better": [1], "unrated": [0]}
