"""Unit tests for model/chat.py: token-exact Llama 2 / Llama 3 chat formats, loss masks, dates, errors.

Run: ``pytest tests/unit/test_chat.py``. Real-tokenizer tests skip when the shared data is absent; the mask
and error tests use a byte-level stand-in tokenizer and always run.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from model.chat import ChatEncoding, Message, encode_chat, parse_messages
from model.tokenizer import Llama3Tokenizer, SentencePieceTokenizer, load_tokenizer
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(120)


class ByteTokenizer:
    """One id per UTF-8 byte, plus bos/eos and the three Llama 3 chat specials."""

    SPECIALS = ("<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    vocab_size = 256 + len(SPECIALS)
    bos_id, eos_id, pad_id = 256, 257, 0
    stop_ids = (257, 260)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.id_to_piece(i) if i >= 256 else bytes([i]).decode("latin-1") for i in ids)

    def id_to_piece(self, i: int) -> str:
        return self.SPECIALS[i - 256] if i >= 256 else chr(i)

    def piece_to_id(self, piece: str) -> int:
        return 256 + self.SPECIALS.index(piece) if piece in self.SPECIALS else ord(piece)

    def file_hash(self) -> str:
        return "0" * 64


DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": " 4\n"},
]


@pytest.fixture(scope="module")
def l2(shared_data: Path) -> SentencePieceTokenizer:
    return load_tokenizer(require_file(shared_data / "tokenizers/llama2/tokenizer.model"))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def l3(shared_data: Path) -> Llama3Tokenizer:
    return load_tokenizer(require_file(shared_data / "tokenizers/llama3/tokenizer.model"))  # type: ignore[return-value]


def masked_text(tok, enc: ChatEncoding, turn: int | None = None) -> str:
    return tok.decode([i for i, m, t in zip(enc.ids, enc.assistant_mask, enc.turn_index)
                       if m and (turn is None or t == turn)])


# ---------------------------------------------------------------- token-exact on the real tokenizers


def test_llama2_token_exact(l2: SentencePieceTokenizer) -> None:
    enc = encode_chat(l2, DIALOG[:4], template="llama2", add_generation_prompt=True)
    # Written from the pieces of "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. " and
    # "[INST] 2+2? [/INST]", each turn with its own <s> (and </s> after the answer), as Meta's chat_completion.
    pieces = ["<s>", "▁[", "INST", "]", "▁<<", "SY", "S", ">>", "<0x0A>", "Be", "▁brief", ".", "<0x0A>",
              "<", "</", "SY", "S", ">>", "<0x0A>", "<0x0A>", "Hi", "!", "▁[", "/", "INST", "]",
              "▁Hello", ".", "▁", "</s>",
              "<s>", "▁[", "INST", "]", "▁", "2", "+", "2", "?", "▁[", "/", "INST", "]"]
    assert [l2.id_to_piece(i) for i in enc.ids] == pieces
    assert enc.ids[:4] == [1, 518, 25580, 29962] and enc.ids[26:30] == [15043, 29889, 29871, 2]
    assert enc.assistant_mask == [0] * 26 + [1] * 4 + [0] * 13
    assert enc.turn_index == [-1] * 26 + [0] * 4 + [-1] * 13


def test_llama3_token_exact(l3: Llama3Tokenizer) -> None:
    enc = encode_chat(l3, DIALOG[1:3], template="llama3", add_generation_prompt=False)
    # <|begin_of_text|> <|start_header_id|> user <|end_header_id|> "\n\n" Hi ! <|eot_id|>
    # <|start_header_id|> assistant <|end_header_id|> "\n\n" Hello . <|eot_id|>
    assert enc.ids == [128000, 128006, 882, 128007, 271, 13347, 0, 128009,
                       128006, 78191, 128007, 271, 9906, 13, 128009]
    assert enc.assistant_mask == [0] * 12 + [1] * 3
    assert enc.turn_index == [-1] * 12 + [0] * 3
    prompt = encode_chat(l3, DIALOG[1:2], template="llama3", add_generation_prompt=True)
    assert prompt.ids == enc.ids[:12] and prompt.assistant_mask == [0] * 12


def meta_llama2(tok, dialog: list[dict]) -> list[int]:
    """Meta llama/generation.py chat_completion's token building, transcribed."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]}] + dialog[2:]
    tokens: list[int] = sum(
        [tok.encode(f"[INST] {(p['content']).strip()} [/INST] {(a['content']).strip()} ", bos=True, eos=True)
         for p, a in zip(dialog[::2], dialog[1::2])], [])
    if dialog[-1]["role"] == "user":
        tokens += tok.encode(f"[INST] {(dialog[-1]['content']).strip()} [/INST]", bos=True, eos=False)
    return tokens


def meta_llama3(tok: Llama3Tokenizer, dialog: list[dict]) -> list[int]:
    """Meta llama3 ChatFormat.encode_dialog_prompt, transcribed."""
    sp = tok.special_tokens

    def header(role: str) -> list[int]:
        return [sp["<|start_header_id|>"]] + tok.encode(role) + [sp["<|end_header_id|>"]] + tok.encode("\n\n")

    tokens = [sp["<|begin_of_text|>"]]
    for m in dialog:
        tokens += header(m["role"]) + tok.encode(m["content"].strip()) + [sp["<|eot_id|>"]]
    return tokens + header("assistant")


DIALOGS = [
    DIALOG,
    DIALOG[:4],
    DIALOG[1:],
    [{"role": "user", "content": "  Café 東京 <|eot_id|> [not a tag]\n"}],
    [{"role": "system", "content": " sys "}, {"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "Write 3 lines."}, {"role": "assistant", "content": "a\nb\n\nc  d"},
     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome!"}],
]


@pytest.mark.parametrize("dialog", DIALOGS, ids=range(len(DIALOGS)))
def test_matches_meta_reference(dialog: list[dict], l2: SentencePieceTokenizer, l3: Llama3Tokenizer) -> None:
    assert encode_chat(l2, dialog, template="llama2").ids == meta_llama2(l2, dialog)
    assert encode_chat(l3, dialog, template="llama3", add_generation_prompt=True).ids == meta_llama3(l3, dialog)
    if dialog[-1]["role"] == "assistant":  # training example = prompt + answer tokens, mask starts at the seam
        for tok, tpl in ((l2, "llama2"), (l3, "llama3")):
            full = encode_chat(tok, dialog, template=tpl)
            prompt = encode_chat(tok, dialog[:-1], template=tpl, add_generation_prompt=True)
            assert full.ids[: len(prompt)] == prompt.ids
            assert full.assistant_mask[: len(prompt)] == prompt.assistant_mask
            assert full.turn_index[: len(prompt)] == prompt.turn_index
            assert set(full.assistant_mask[len(prompt):]) == {1}
            assert set(full.turn_index[len(prompt):]) == {max(prompt.turn_index) + 1}
            stop = tok.eos_id if tpl == "llama2" else l3.special_tokens["<|eot_id|>"]
            assert full.ids[-1] == stop and stop in tok.stop_ids


def test_real_masks_decode_to_answers(l2: SentencePieceTokenizer, l3: Llama3Tokenizer) -> None:
    enc = encode_chat(l2, DIALOG, template="llama2")
    assert masked_text(l2, enc, 0) == "Hello. " and masked_text(l2, enc, 1) == "4 "  # </s> decodes to ""
    enc = encode_chat(l3, DIALOG, template="llama3")
    assert masked_text(l3, enc, 0) == "Hello.<|eot_id|>" and masked_text(l3, enc, 1) == "4<|eot_id|>"


# ---------------------------------------------------------------- masks (byte stand-in, always runs)


def test_masks_and_turn_index_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    enc = encode_chat(tok, DIALOG, template="llama3")
    assert len(enc) == len(enc.ids) == len(enc.assistant_mask) == len(enc.turn_index)
    assert masked_text(tok, enc, 0) == "Hello.<|eot_id|>" and masked_text(tok, enc, 1) == "4<|eot_id|>"
    assert tok.decode(enc.ids).startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert all((t >= 0) == bool(m) for m, t in zip(enc.assistant_mask, enc.turn_index))
    enc = encode_chat(tok, DIALOG, template="llama2")
    # The answer's leading space (after "[/INST]") and trailing space are the assistant's to generate.
    assert masked_text(tok, enc, 0) == " Hello. </s>" and masked_text(tok, enc, 1) == " 4 </s>"
    assert tok.decode(enc.ids).startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>")
    assert max(enc.turn_index) == 1


def test_date_preamble() -> None:
    tok = ByteTokenizer()
    pre = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"
    for date in (datetime.date(2024, 7, 26), "2024-07-26", "26 Jul 2024"):
        text = tok.decode(encode_chat(tok, DIALOG[1:2], template="llama3", date=date).ids)
        assert text == f"<s><|start_header_id|>system<|end_header_id|>\n\n{pre}<|eot_id|>" \
                       "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    text = tok.decode(encode_chat(tok, DIALOG[:2], template="llama3", date="2024-07-26").ids)
    assert f"\n\n{pre}\n\nBe brief.<|eot_id|>" in text
    text = tok.decode(encode_chat(tok, DIALOG[:2], template="llama2", date=datetime.date(2024, 7, 26)).ids)
    assert text == f"<s>[INST] <<SYS>>\n{pre}\n\nBe brief.\n<</SYS>>\n\nHi! [/INST]"
    text = tok.decode(encode_chat(tok, DIALOG[1:2], template="llama2", date="2024-01-05").ids)
    assert "Today Date: 05 Jan 2024\n<</SYS>>\n\nHi! [/INST]" in text
    with pytest.raises(ValueError, match="date: 'July 26'"):
        encode_chat(tok, DIALOG[1:2], template="llama3", date="July 26")


# ---------------------------------------------------------------- errors


def test_parse_messages() -> None:
    assert parse_messages(DIALOG[:2]) == [Message("system", "Be brief."), Message("user", "Hi!")]
    with pytest.raises(ValueError, match=r"messages\[1\]: missing field\(s\) \['content'\]"):
        parse_messages([{"role": "user", "content": "x"}, {"role": "assistant"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.role: 'bot' is not one of"):
        parse_messages([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content: expected str, got int"):
        parse_messages([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="expected a list"):
        parse_messages("user: hi")
    with pytest.raises(ValueError, match=r"messages\[0\]: expected a dict"):
        parse_messages([("user", "hi")])


def test_encode_chat_errors() -> None:
    tok = ByteTokenizer()
    u, a, s = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))
    with pytest.raises(ValueError, match=r"messages\[2\]\.role: expected 'assistant', got 'user'"):
        encode_chat(tok, [s, u, u], template="llama2")
    with pytest.raises(ValueError, match=r"messages\[0\]\.role: expected 'user', got 'assistant'"):
        encode_chat(tok, [a, u], template="llama2")
    with pytest.raises(ValueError, match=r"messages\[2\]\.role: 'system' is only allowed as the first"):
        encode_chat(tok, [u, a, s], template="llama3")
    with pytest.raises(ValueError, match="needs a user message after the system"):
        encode_chat(tok, [s], template="llama2")
    with pytest.raises(ValueError, match=r"messages\[1\]\.content: contains the Llama 2 control tag '\[/INST\]'"):
        encode_chat(tok, [u, {"role": "assistant", "content": "ok [/INST] hi"}], template="llama2")
    with pytest.raises(ValueError, match="must end with a user message"):
        encode_chat(tok, [u, a], template="llama2", add_generation_prompt=True)
    with pytest.raises(ValueError, match="template: 'chatml'"):
        encode_chat(tok, [u], template="chatml")
    with pytest.raises(ValueError, match="empty"):
        encode_chat(tok, [], template="llama3")
    # Llama 3, like Meta's ChatFormat, does not force alternation.
    assert encode_chat(tok, [u, u, a, a], template="llama3").turn_index.count(1) == 2


def test_llama3_template_needs_llama3_tokenizer(l2: SentencePieceTokenizer) -> None:
    with pytest.raises(ValueError, match=re.escape("needs a Llama 3 tokenizer with <|start_header_id|>")):
        encode_chat(l2, DIALOG[1:2], template="llama3")


# ---------------------------------------------------------------- Llama 3.1 (llama-models)
# What Meta's llama-models ChatFormat.encode_dialog_prompt produces after llama-stack's
# augment_messages_for_tools_llama_3_1 (SystemDefaultGenerator: "%d %B %Y", template ends with a newline; an
# existing system prompt follows after one more "\n"; contents not stripped), written out by hand.
L31_SYSTEM = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
              "Today Date: 26 July 2024\n")


def test_llama3_1_format_by_hand() -> None:
    tok = ByteTokenizer()
    enc = encode_chat(tok, DIALOG, template="llama3_1")
    assert tok.decode(enc.ids) == (
        "<s>" + L31_SYSTEM + "\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n 4\n<|eot_id|>")
    assert masked_text(tok, enc, 1) == " 4\n<|eot_id|>"  # llama-models keeps the content's spaces
    prompt = encode_chat(tok, DIALOG[1:2], template="llama3_1", add_generation_prompt=True)
    assert tok.decode(prompt.ids) == ("<s>" + L31_SYSTEM + "<|eot_id|><|start_header_id|>user<|end_header_id|>"
                                      "\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    dated = encode_chat(tok, DIALOG[1:2], template="llama3_1", date="2024-12-05")
    assert "Today Date: 05 December 2024\n<|eot_id|>" in tok.decode(dated.ids)
    assert tok.decode(encode_chat(tok, DIALOG[1:2], template="llama3_1", date="5 March 2025").ids).count(
        "Today Date: 05 March 2025\n") == 1


def test_llama3_1_tokens_with_the_real_tokenizer(l3: Llama3Tokenizer) -> None:
    """Special ids written out (begin_of_text 128000, start/end header 128006/128007, eot 128009) and the whole
    formatted string encoded with specials give the same ids as the per-message encoding."""
    enc = encode_chat(l3, DIALOG[:3], template="llama3_1")
    system = "Cutting Knowledge Date: December 2023\nToday Date: 26 July 2024\n\nBe brief."
    expected = ([128000, 128006] + l3.encode("system") + [128007] + l3.encode("\n\n") + l3.encode(system) + [128009]
                + [128006] + l3.encode("user") + [128007] + l3.encode("\n\n") + l3.encode("Hi!") + [128009]
                + [128006] + l3.encode("assistant") + [128007] + l3.encode("\n\n") + l3.encode("Hello.") + [128009])
    assert enc.ids == expected
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>")
    assert l3.encode_with_special(text) == enc.ids
    assert l3.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if m]) == "Hello.<|eot_id|>"
