"""Unit tests for model/tokenizer.py on the real Llama 2 / Llama 3 tokenizers and a freshly trained one.

Run: ``pytest tests/unit/test_tokenizer.py``. Tests needing the shared data skip when it is absent.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sentencepiece import sentencepiece_model_pb2

from model.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    MAX_NO_WHITESPACES_CHARS,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def l2(shared_data: Path) -> SentencePieceTokenizer:
    tok = load_tokenizer(require_file(shared_data / "tokenizers/llama2/tokenizer.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


@pytest.fixture(scope="module")
def l3(shared_data: Path) -> Llama3Tokenizer:
    tok = load_tokenizer(require_file(shared_data / "tokenizers/llama3/tokenizer.model"))
    assert isinstance(tok, Llama3Tokenizer)
    return tok


@pytest.fixture(scope="module")
def wikitext(shared_data: Path) -> str:
    path = require_file(shared_data / "wikipedia/wikitext-2-raw.test.txt")
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- Llama 2


def test_llama2_ids_and_specials(l2: SentencePieceTokenizer) -> None:
    assert isinstance(l2, Tokenizer)
    assert (l2.vocab_size, l2.bos_id, l2.eos_id, l2.pad_id, l2.stop_ids) == (32000, 1, 2, 0, (2,))
    # Known ids (HF's LlamaTokenizer docstring: "Hello this is a test" -> 15043, 445, 338, 263, 1243).
    assert l2.encode("Hello this is a test", bos=True, eos=True) == [1, 15043, 445, 338, 263, 1243, 2]
    assert [l2.id_to_piece(i) for i in l2.encode("12345")] == ["▁", "1", "2", "3", "4", "5"]
    assert [l2.id_to_piece(i) for i in l2.encode("𝔘")] == ["▁", "<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]
    # Control-piece text in the input is plain text, never the bos/eos ids.
    assert 1 not in l2.encode("<s>hi</s>") and 2 not in l2.encode("<s>hi</s>")
    assert l2.piece_to_id("<s>") == 1 and l2.piece_to_id("</s>") == 2 and l2.piece_to_id("<unk>") == 0
    assert l2.piece_to_id("▁Hello") == 15043 and l2.id_to_piece(15043) == "▁Hello"
    with pytest.raises(KeyError, match="not in the vocabulary"):
        l2.piece_to_id("definitely-not-a-piece")
    with pytest.raises(ValueError, match="out of range"):
        l2.id_to_piece(32000)
    h = l2.file_hash()
    assert h.startswith("9e556afd") and h.endswith("d347")


def test_llama2_round_trip_and_batch(l2: SentencePieceTokenizer) -> None:
    texts = ["Hello world", "  two  spaces\n\nand\ttabs ", "naïve café 東京 𝔘 🙂", "", "x" * 5000]
    for t in texts:
        assert l2.decode(l2.encode(t, bos=True, eos=True)) == t
    assert l2.encode_batch(texts, bos=True) == [l2.encode(t, bos=True) for t in texts]
    assert l2.encode_batch([]) == []
    with pytest.raises(TypeError, match="encode_batch"):
        l2.encode(["not", "a", "str"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- Llama 3


def test_llama3_ids_and_specials(l3: Llama3Tokenizer) -> None:
    assert isinstance(l3, Tokenizer)
    assert l3.vocab_size == 128256 and len(LLAMA3_SPECIAL_TOKENS) == 256
    assert l3.special_tokens == LLAMA3_SPECIAL_TOKENS
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_3|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
        "<|reserved_special_token_6|>": 128011, "<|reserved_special_token_250|>": 128255,
    }
    for name, i in expected.items():
        assert LLAMA3_SPECIAL_TOKENS[name] == i and l3.piece_to_id(name) == i and l3.id_to_piece(i) == name
    assert (l3.bos_id, l3.eos_id, l3.pad_id) == (128000, 128001, 128004)
    assert l3.stop_ids == (128001, 128009, 128008)
    assert l3.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert [l3.id_to_piece(i) for i in l3.encode(" the\n\n")] == ["Ġthe", "ĊĊ"]
    assert l3.piece_to_id("Ġthe") == l3.encode(" the")[0]
    with pytest.raises(KeyError):
        l3.piece_to_id("<|not_special|>")
    h = l3.file_hash()
    assert h.startswith("82e9d319") and h.endswith("1b55")


def test_llama3_special_text_is_plain_unless_allowed(l3: Llama3Tokenizer) -> None:
    text = "a<|eot_id|>b<|begin_of_text|>"
    plain = l3.encode(text)
    assert not set(plain) & set(LLAMA3_SPECIAL_TOKENS.values())
    assert l3.decode(plain) == text
    assert l3.encode_with_special(text) == l3.encode("a") + [128009] + l3.encode("b") + [128000]
    assert l3.encode(text, allow_special=True) == l3.encode_with_special(text)
    assert l3.encode_batch([text]) == [plain]


def _meta_substrings(s: str) -> list[str]:
    """Meta's llama3 Tokenizer.encode chunking, written out again (400k chunks, 25k runs)."""
    out: list[str] = []
    for i in range(0, len(s), 400_000):
        out += list(Llama3Tokenizer._split_whitespaces_or_nonwhitespaces(s[i : i + 400_000], 25_000))
    return out


def test_llama3_long_inputs_chunked_like_meta(l3: Llama3Tokenizer) -> None:
    n = MAX_NO_WHITESPACES_CHARS
    cases = [
        "a" * (n + 10) + " " * (2 * n + 3) + "b c",
        ("word " * 90_000) + "\u3000" * (n + 1) + "end",  # > 400k chars, a long run of unicode space
        "x" * n + " y",
    ]
    for s in cases:
        pieces = list(l3._substrings(s))
        assert pieces == _meta_substrings(s)
        expected = [t for p in pieces for t in l3._enc.encode_ordinary(p)]
        assert l3.encode(s) == expected
        assert l3.decode(l3.encode(s)) == s
    assert l3.encode_batch(cases + [""], eos=True) == [l3.encode(s, eos=True) for s in cases + [""]]


def test_llama3_round_trip(l3: Llama3Tokenizer) -> None:
    for t in ["Hello world", "  two  spaces\r\n\r\nand\ttabs ", "naïve café 東京 𝔘 🙂", "", "I'M 12345!"]:
        assert l3.decode(l3.encode(t, bos=False)) == t
    with pytest.raises(ValueError, match="out of range"):
        l3.decode([128256])


# ---------------------------------------------------------------- loading / sniffing


def test_load_tokenizer_sniffs_format(shared_data: Path) -> None:
    l3_dir = require_file(shared_data / "tokenizers/llama3")
    assert isinstance(load_tokenizer(l3_dir), Llama3Tokenizer)  # a directory -> its tokenizer.model
    tok512 = load_tokenizer(require_file(shared_data / "checkpoints/stories260K/tok512.model"))
    assert isinstance(tok512, SentencePieceTokenizer) and tok512.vocab_size == 512


def test_load_tokenizer_bad_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.model"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="junk.model.*expected a SentencePiece model"):
        load_tokenizer(junk)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model: empty file"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.model
    ranks = tmp_path / "ranks.tiktoken"
    ranks.write_text("IQ== 0\nIg== 1\nnot base64!! x\n")
    with pytest.raises(ValueError, match=r"ranks.tiktoken:3: not a tiktoken ranks line"):
        load_tokenizer(ranks)


def test_small_tiktoken_file(tmp_path: Path) -> None:
    """Special ids follow the base vocabulary, whatever its size."""
    ranks = tmp_path / "tiny.tiktoken"
    import base64

    ranks.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = load_tokenizer(ranks)
    assert isinstance(tok, Llama3Tokenizer)
    assert tok.vocab_size == 512 and tok.bos_id == 256 and tok.piece_to_id("<|eot_id|>") == 265
    assert tok.encode("hi") == [ord("h"), ord("i")] and tok.decode(tok.encode("héllo")) == "héllo"


# ---------------------------------------------------------------- training


def _proto(path: Path) -> sentencepiece_model_pb2.ModelProto:
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(path.read_bytes())
    return m


def test_train_sentencepiece_llama_style(tmp_path: Path, wikitext: str, shared_data: Path) -> None:
    lines = wikitext.splitlines()[:600]
    start = time.perf_counter()
    path = train_sentencepiece(texts=iter(lines), output_prefix=tmp_path / "tok" / "tok1k", vocab_size=1000)
    assert time.perf_counter() - start < 20
    assert path == tmp_path / "tok" / "tok1k.model" and path.is_file()
    tok = load_tokenizer(path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (1000, 1, 2, 0)
    # Byte fallback: an unseen character becomes its UTF-8 bytes, and decodes back.
    assert [tok.id_to_piece(i) for i in tok.encode("𝔘")] == ["▁", "<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]
    for text in ["𝔘 unseen ☃ text", "  spaced   out  ", "The 2011 season"]:
        assert tok.decode(tok.encode(text)) == text
    # Digits split: every digit is its own piece.
    assert [tok.id_to_piece(i) for i in tok.encode("12345")] == ["▁", "1", "2", "3", "4", "5"]
    # Same normalizer and key trainer flags as Meta's Llama 2 tokenizer.model.
    ours = _proto(path)
    meta = _proto(require_file(shared_data / "tokenizers/llama2/tokenizer.model"))
    for field in ("name", "precompiled_charsmap", "add_dummy_prefix", "remove_extra_whitespaces"):
        assert getattr(ours.normalizer_spec, field) == getattr(meta.normalizer_spec, field), field
    for flag in ("model_type", "character_coverage", "split_digits", "byte_fallback", "allow_whitespace_only_pieces",
                 "unk_id", "bos_id", "eos_id", "pad_id", "max_sentencepiece_length", "split_by_whitespace"):
        assert getattr(ours.trainer_spec, flag) == getattr(meta.trainer_spec, flag), flag
    # Deterministic: the same input gives the same pieces and scores.
    again = train_sentencepiece(texts=lines, output_prefix=tmp_path / "again", vocab_size=1000)
    assert [(p.piece, p.score) for p in _proto(again).pieces] == [(p.piece, p.score) for p in ours.pieces]


def test_train_sentencepiece_long_lines_and_errors(tmp_path: Path, wikitext: str) -> None:
    text = " ".join(wikitext.split()[:20_000])  # one ~110 KB line: cut, not skipped by the trainer
    path = train_sentencepiece(texts=[text], output_prefix=tmp_path / "long", vocab_size=600)
    assert load_tokenizer(path).vocab_size == 600
    with pytest.raises(ValueError, match="SentencePiece training .*too_small.model failed"):
        train_sentencepiece(texts=[text], output_prefix=tmp_path / "too_small", vocab_size=100)
