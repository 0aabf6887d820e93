"""SFT packing, reward-model pair encoding, file sniffing and the shared hash split (the batch order: test_global_batch.py).

Uses the synthetic SentencePiece model of ``rlhf.synthetic`` (trained once per session, ~2 s), no shared data.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from model.chat import encode_chat
from rlhf.batching import (
    collate_pairs,
    encode_answer,
    encode_pair,
    pack_sft_rows,
    sft_example,
    stack_rows,
)
from rlhf.data import Dialogue, PreferencePair
from rlhf.sources import dataset_name, load_dialogues, load_pairs, load_prompts, sniff_format, unique_names
from rlhf.synthetic import synthetic_tokenizer, write_synthetic_preferences

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(synthetic_tokenizer(tmp_path_factory.mktemp("tok") / "tok"))


def _dialogue(*turns: str) -> Dialogue:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return Dialogue(messages=msgs, system=None, date=None, source="t", id="x")


def test_sft_example_trains_on_answers_only(tok) -> None:
    d = _dialogue("tell me about the river.", "sunny apple stone.", "and the garden?", "green quiet music.")
    stats: Counter[str] = Counter()
    inputs, labels, mask = sft_example(tok, d, template="llama2", seq_len=512, stats=stats)
    enc = encode_chat(tok, d.messages, template="llama2")
    assert inputs == enc.ids[:-1] and labels == enc.ids[1:]
    assert mask == [float(m) for m in enc.assistant_mask[1:]]
    learned = tok.decode([lab for lab, m in zip(labels, mask) if m])
    assert "sunny apple stone." in learned and "green quiet music." in learned
    assert "river" not in learned and "garden" not in learned  # no loss on the user's turns
    assert labels[-1] == tok.eos_id and mask[-1] == 1.0  # the end-of-answer token is learned


def test_sft_truncation_and_skips_are_counted(tok) -> None:
    long_answer = " ".join(["stone apple"] * 40)
    stats: Counter[str] = Counter()
    ex = sft_example(tok, _dialogue("hi", long_answer), template="llama2", seq_len=24, stats=stats)
    assert ex is not None and len(ex[0]) == 24 and stats["truncated"] == 1
    prompt_only = sft_example(tok, _dialogue(" ".join(["river"] * 60), "ok."), template="llama2", seq_len=24,
                              stats=stats)
    assert prompt_only is None and stats["skipped_no_answer_tokens_within_seq_len"] == 1


def test_packing_keeps_documents_apart_and_is_deterministic(tok) -> None:
    examples = [([i] * n, [i + 1] * n, [1.0] * n) for i, n in enumerate([5, 9, 3, 7, 2, 6])]
    rows, stats = pack_sft_rows(examples, seq_len=12, pad_id=0)
    again, _ = pack_sft_rows(examples, seq_len=12, pad_id=0)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(rows, again) for k in a)
    assert stats["tokens"] == sum(len(e[0]) for e in examples) and stats["rows"] == len(rows) == 4
    layout = []
    for row in rows:  # each document one id, ids increasing, padding its own id without loss
        docs, inputs = row["document_ids"].tolist(), row["input_ids"].tolist()
        pad = row["loss_mask"] == 0
        layout.append([(inputs[docs.index(d)], docs.count(d)) for d in sorted(set(docs)) if not pad[docs.index(d)]])
        assert docs == sorted(docs)
        assert (row["document_ids"][pad] == len(layout[-1])).all() and int(pad.sum()) == 12 - sum(n for _, n in
                                                                                                   layout[-1])
    # first-fit in order: 5 opens row 0, 9 row 1, 3 joins row 0, 7 opens row 2, 2 joins row 0, 6 opens row 3
    assert layout == [[(0, 5), (2, 3), (4, 2)], [(1, 9)], [(3, 7)], [(5, 6)]]
    batch = stack_rows(rows)
    assert batch["input_ids"].shape == (4, 12) and batch["loss_mask"].sum() == stats["loss_tokens"]


def test_pair_encoding_scores_the_answers_last_token(tok) -> None:
    pair = PreferencePair(prompt=[{"role": "user", "content": "tell me about the river."}], chosen="sunny stone.",
                          rejected="apple.", rating="better", is_safety=False, source="t", id="p")
    item = encode_pair(tok, pair, template="llama2", max_len=256, margin_table="large")
    assert item["chosen"][item["chosen_index"]] == tok.eos_id and item["chosen_index"] == len(item["chosen"]) - 1
    assert item["margin"] == 2.0
    stats: Counter[str] = Counter()
    ids, where = encode_answer(tok, [{"role": "user", "content": " ".join(["river"] * 80)}], "sunny stone.",
                               template="llama2", max_len=32, stats=stats)
    assert len(ids) == 32 and ids[0] == tok.bos_id and ids[where] == tok.eos_id and stats["truncated_left"] == 1
    assert "sunny stone." in tok.decode(ids)  # the answer survives; the oldest prompt tokens go
    batch = collate_pairs([item, encode_pair(tok, pair, template="llama2", max_len=256, margin_table="none")])
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 8 == 0
    assert batch["score_index"].tolist() == [item["chosen_index"]] * 2 + [item["rejected_index"]] * 2
    assert batch["margin"].tolist() == [2.0, 0.0] and batch["pair_weight"].tolist() == [1.0, 1.0]


def test_sniff_format_and_clear_errors(tmp_path: Path) -> None:
    prefs = write_synthetic_preferences(tmp_path / "p.jsonl", n=5, seed=0, graded=False)
    assert sniff_format(prefs) == "preferences"
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    assert sniff_format(tmp_path / "d.jsonl") == "dialogues"
    (tmp_path / "h.jsonl").write_text("not json\n" + json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                               "rejected": "\n\nHuman: a\n\nAssistant: c"}) + "\n")
    assert sniff_format(tmp_path / "h.jsonl") == "hh"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: cannot tell the format from fields \['text'\]"):
        sniff_format(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="holds dialogues"):
        load_pairs(tmp_path / "d.jsonl", is_safety=False, valid_fraction=0.1, seed="s")
    assert dataset_name("x/helpful-base/test.jsonl.gz") == "helpful-base"
    assert unique_names(["a/prefs.jsonl", "b/prefs.jsonl"]) == ["prefs", "prefs-2"]


def test_malformed_records_are_counted_not_dropped(tmp_path: Path) -> None:
    good = {"prompt": "tell me", "chosen": "a", "rejected": "b"}
    lines = [json.dumps(good), "{broken", json.dumps({**good, "rating": "amazing"}), json.dumps({"prompt": "x"})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    split = load_pairs(tmp_path / "p.jsonl", is_safety=False, valid_fraction=0.0, seed="s")
    assert len(split.train) == 1 and split.report.read == 4
    assert dict(split.report.skipped) == {"bad_json": 1, "unknown_rating": 1, "missing_field": 1}
    assert "p.jsonl:2: bad_json" in split.describe()


def test_sft_rm_and_prompts_share_the_split(tmp_path: Path) -> None:
    """A prompt held out from the reward model is held out from SFT and is a held-out sampling prompt."""
    prefs = write_synthetic_preferences(tmp_path / "p.jsonl", n=300, seed=1, graded=True)
    pairs = load_pairs(prefs, is_safety=False, valid_fraction=0.2, seed="s")
    dialogues = load_dialogues(prefs, valid_fraction=0.2, seed="s")
    prompts, _ = load_prompts(prefs, side="valid", valid_fraction=0.2, seed="s")
    held = {p.prompt[0]["content"] for p in pairs.valid}
    assert 30 < len(held) < 90
    assert {d.messages[0]["content"] for d in dialogues.valid} == held
    assert {d.messages[0]["content"] for d in dialogues.train}.isdisjoint(held)
    assert {p.turns[0]["content"] for p in prompts} == held
    assert [d.messages[-1]["content"] for d in dialogues.valid] == [p.chosen for p in pairs.valid]
    capped = load_pairs(prefs, is_safety=False, valid_fraction=0.2, seed="s", max_records=100)
    assert capped.capped_from == 300 and {p.id for p in capped.valid} <= {p.id for p in pairs.valid}
