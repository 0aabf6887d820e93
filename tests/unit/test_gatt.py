"""Ghost Attention: instructions and checkers, the built dialogues and their token-exact loss masks, datasets, the
adherence table (run: ``pytest tests/unit/test_gatt.py``).

The token-exact tests write the expected ids out from Meta's Llama 2 chat format, ``[BOS] + encode("[INST] {u}
[/INST] {a} ") + [EOS]`` per turn, with a byte-level stand-in tokenizer (always runs) and the real Llama 2
tokenizer (skips without the shared data).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from rlhf.gatt.data import (
    ExampleDataset,
    GAttDialogue,
    attach,
    build_dialogues,
    read_gatt_jsonl,
    training_examples,
    write_gatt_jsonl,
)
from rlhf.gatt.evaluate import adherence_by_turn, evaluate_models, markdown_table
from rlhf.gatt.instructions import (
    LANGUAGES,
    Check,
    Instruction,
    detect_language,
    load_instructions,
    sample_instruction,
)
from rlhf.gatt.task import GAttSection, load_train_config
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(120)


class ByteTokenizer:
    vocab_size, bos_id, eos_id, pad_id, stop_ids = 258, 256, 257, 0, (257,)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode()


def is_uppercase(answer: str) -> bool:  # a user-given checker (module:function)
    return answer.isupper()


INST = Instruction(text="Answer in upper case.", short="Case: upper", checks=(Check("uppercase"),))


# ---------------------------------------------------------------------------------------------- instructions


def test_sampled_instructions_cover_categories_and_short_forms() -> None:
    rng = random.Random(0)
    insts = [sample_instruction(rng) for _ in range(400)]
    shortened = sum(i.text == i.short for i in insts)
    assert 150 < shortened < 250  # half the time shortened
    texts = " ".join(i.text for i in insts)
    for marker in ("You enjoy", "Speak in", "Act as", "Hobby:", "Language:", "Figure:"):
        assert marker in texts, marker
    assert any(len(i.checks) == 2 for i in insts) and any(len(i.checks) == 1 for i in insts)
    one = sample_instruction(random.Random(1), categories=("figure",), shorten_probability=1.0)
    assert one.text.startswith("Figure: ") and one.checks[0].kind == "keyword"
    assert sample_instruction(random.Random(5)) == sample_instruction(random.Random(5))


def test_checkers() -> None:
    assert detect_language("Bonjour, je suis très content de vous voir aujourd'hui.") == LANGUAGES["French"]
    assert Check("language", "es")("Hola, ¿cómo estás? Me gusta mucho la playa.")
    assert not Check("language", "es")("Hello, how are you? I like the beach a lot.")
    napoleon = Check("keyword", "napoleon|emperor")
    assert napoleon("As Emperor, I ride.") and not napoleon("I am a cat.")
    assert Check("ends_with", "moon")("the cat is happy moon.") and not Check("ends_with", "moon")("moon is up")
    assert Check("uppercase")("HELLO THERE!") and not Check("uppercase")("Hello") and not Check("uppercase")("123")
    user_given = Check.parse("tests.unit.test_gatt:is_uppercase")
    assert user_given("YES") and not user_given("no")
    with pytest.raises(ValueError, match="unknown checker"):
        Check.parse("rhymes:cat")
    both = Instruction(text="x", checks=(Check("ends_with", "sun"), Check("uppercase")))
    assert both.adheres("LOOK AT THE SUN") and not both.adheres("look at the sun")


def test_load_user_instructions(tmp_path: Path) -> None:
    path = tmp_path / "inst.jsonl"
    path.write_text(json.dumps({"text": "End with moon.", "short": "End: moon", "checks": ["ends_with:moon"]}) + "\n")
    [inst] = load_instructions(path)
    assert inst.checks == (Check("ends_with", "moon"),) and Instruction.from_dict(inst.to_dict()) == inst
    path.write_text(json.dumps({"short": "x"}) + "\n")
    with pytest.raises(ValueError, match="record 1: .*non-empty 'text'"):
        load_instructions(path)


# ---------------------------------------------------------------------------------------------- build


def test_build_attaches_everywhere_then_keeps_the_first_only(tmp_path: Path) -> None:
    seen: list[list[dict]] = []

    def answer_fn(prompts: list[list[dict]]) -> list[str]:
        seen.extend(prompts)
        return [f"A{sum(m['role'] == 'user' for m in p)}" for p in prompts]

    built = build_dialogues([["u1", "u2", "u3"], ["v1"]], [INST, INST], answer_fn=answer_fn)
    # The model saw the instruction in EVERY user message, and its own earlier answers.
    assert seen[2] == [{"role": "user", "content": "Answer in upper case. u1"}, {"role": "assistant", "content": "A1"},
                       {"role": "user", "content": "Answer in upper case. u2"}]
    assert all(m["content"].startswith("Answer in upper case.") for p in seen for m in p if m["role"] == "user")
    assert built[0].messages == [
        {"role": "user", "content": attach("u1", INST.text)}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "u3"}, {"role": "assistant", "content": "A3"}]
    assert built[1].messages[0]["content"] == "Answer in upper case. v1" and len(built[1].messages) == 2
    write_gatt_jsonl(built, tmp_path / "g.jsonl")
    assert [d.messages for d in read_gatt_jsonl(tmp_path / "g.jsonl")] == [d.messages for d in built]


def _llama2_turn(tok: object, user: str, answer: str) -> tuple[list[int], list[int]]:
    """Meta's encoding of one (user, answer) turn and how many of its tokens are the answer's (+ EOS)."""
    prompt = tok.encode(f"[INST] {user} [/INST]")
    full = tok.encode(f"[INST] {user} [/INST] {answer} ")
    assert full[: len(prompt)] == prompt
    return [tok.bos_id] + full + [tok.eos_id], len(full) - len(prompt) + 1


def _expected(tok: object, dialogue: GAttDialogue) -> tuple[list[int], list[int]]:
    msgs = dialogue.messages
    ids: list[int] = []
    mask: list[int] = []
    for k in range(0, len(msgs), 2):
        turn, n_answer = _llama2_turn(tok, msgs[k]["content"], msgs[k + 1]["content"])
        last = k == len(msgs) - 2
        ids += turn
        mask += [0] * (len(turn) - n_answer) + [1 if last else 0] * n_answer
    return ids, mask


def _check_token_exact(tok: object) -> None:
    d = GAttDialogue(messages=[
        {"role": "user", "content": attach("What is Paris?", "Act as Napoleon.")},
        {"role": "assistant", "content": "My capital."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "A city I took."}], instruction=INST)
    [ex], report = training_examples([d], tokenizer=tok, template="llama2", train_turns="last")
    ids, mask = _expected(tok, d)
    assert ex.ids == ids and ex.loss_mask == mask and report["kept"] == 1
    # Only the last answer and its </s> learn; the first answer's tokens (and its </s>) have loss 0.
    learned = [i for i, m in zip(ex.ids, ex.loss_mask) if m]
    assert learned[-1] == tok.eos_id and tok.decode(learned[:-1]).strip() == "A city I took."
    [sft], _ = training_examples([d], tokenizer=tok, template="llama2", train_turns="all")
    assert sum(sft.loss_mask) > sum(ex.loss_mask) and all(s >= g for s, g in zip(sft.loss_mask, ex.loss_mask))


def test_token_exact_dialogue_and_mask_byte_tokenizer() -> None:
    _check_token_exact(ByteTokenizer())


def test_token_exact_dialogue_and_mask_llama2_tokenizer(shared_data: Path) -> None:
    from model.tokenizer import load_tokenizer

    _check_token_exact(load_tokenizer(require_file(shared_data / "tokenizers" / "llama2" / "tokenizer.model")))


def test_random_truncation_trains_the_last_kept_turn() -> None:
    tok = ByteTokenizer()
    msgs = []
    for k in range(5):
        msgs += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"answer {k}"}]
    examples, _ = training_examples([msgs] * 40, tokenizer=tok, template="llama2", truncate="random", seed=0)
    lengths = {sum(i == tok.bos_id for i in e.ids) for e in examples}
    assert lengths == {1, 2, 3, 4, 5}  # every depth appears
    for e in examples:
        turns = sum(i == tok.bos_id for i in e.ids)
        learned = tok.decode([i for i, m in zip(e.ids, e.loss_mask) if m])
        assert learned.strip() == f"answer {turns - 1}"
    bad, report = training_examples([msgs[:-1]], tokenizer=tok, template="llama2")
    assert not bad and report["skipped: does not end with an assistant turn"] == 1


def test_example_dataset_alignment_and_order() -> None:
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    examples, _ = training_examples([msgs, msgs + msgs], tokenizer=tok, template="llama2")
    ds = ExampleDataset(examples, seq_len=40, num_samples=6, seed=0)
    assert ds.dropped == 1  # the two-turn example is longer than 41 tokens
    item = ds[0]
    e = examples[0]
    n = len(e.ids)
    assert item["tokens"][: n - 1].tolist() == e.ids[:-1] and item["labels"][: n - 1].tolist() == e.ids[1:]
    assert item["loss_mask"][: n - 1].tolist() == [float(m) for m in e.loss_mask[1:]]
    assert float(item["loss_mask"][n - 1 :].sum()) == 0 and item["tokens"].shape == (40,)
    assert torch.equal(ExampleDataset(examples, seq_len=40, num_samples=6, seed=0)[3]["tokens"], ds[3]["tokens"])
    with pytest.raises(ValueError, match="no example fits"):
        ExampleDataset(examples, seq_len=4, num_samples=1, seed=0)


# ---------------------------------------------------------------------------------------------- eval, config


def test_adherence_table() -> None:
    def remembers(prompts: list[list[dict]]) -> list[str]:
        return ["YES" for _ in prompts]

    def forgets(prompts: list[list[dict]]) -> list[str]:
        return ["YES" if p[-1]["content"].startswith("Answer") else "no" for p in prompts]

    turns = [["a", "b", "c"], ["d", "e", "f"]]
    result = evaluate_models({"after": remembers, "before": forgets}, turns, [INST, INST], turns=3)
    assert [r["rate"] for r in result["models"]["after"]["adherence"]] == [1.0, 1.0, 1.0]
    assert [r["rate"] for r in result["models"]["before"]["adherence"]] == [1.0, 0.0, 0.0]
    table = markdown_table(result)
    assert "| 2 | 100% (2/2) | 0% (0/2) |" in table
    rows = adherence_by_turn([["YES"], ["no", "YES"]], [INST, INST], turns=2)
    assert rows == [{"turn": 1, "adherent": 1, "total": 2, "rate": 0.5}, {"turn": 2, "adherent": 1, "total": 1,
                                                                          "rate": 1.0}]


def test_train_config_with_gatt_table(tmp_path: Path) -> None:
    cfg, section = load_train_config("configs/rlhf/gatt_tiny.toml",
                                     ["--gatt.train_turns=all", "--train.steps=7", "--model.overrides.dim=128"])
    assert section == GAttSection(init=section.init, train_turns="all")
    assert cfg.train.steps == 7 and cfg.model.overrides["dim"] == 128 and cfg.data.seq_len == 256
    with pytest.raises(ValueError, match=r"unknown key 'nope' in \[gatt\]"):
        load_train_config(None, ["--gatt.nope=1"])


def test_trimmed_loader_cuts_micro_batches_to_their_longest_example() -> None:
    from data_pipeline.global_batch import GlobalBatchLoader
    from rlhf.gatt.data import collate_trimmed

    tok = ByteTokenizer()
    dialogues = [[{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a"}] for n in (1, 9, 3, 20)]
    examples, _ = training_examples(dialogues, tokenizer=tok, template="llama2")
    ds = ExampleDataset(examples, seq_len=64, num_samples=4, seed=0)
    loader = GlobalBatchLoader(ds, collate=collate_trimmed, global_batch_size=4, micro_batch_size=2, dp_rank=0,
                               dp_size=1)
    batches = list(loader)
    assert len(batches) == 2 and loader.consumed_samples == 4
    for b, idx in zip(batches, ([0, 1], [2, 3])):
        width = max(int(ds[i]["length"]) for i in idx)
        assert b["input_ids"].shape == (2, width) and b["document_ids"].abs().sum() == 0
        for row, i in enumerate(idx):
            assert b["input_ids"][row].tolist() == ds[i]["tokens"][:width].tolist()
            assert b["loss_mask"][row].sum() == ds[i]["loss_mask"].sum()  # nothing trained was cut
