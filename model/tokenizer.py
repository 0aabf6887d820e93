"""Llama tokenizers: SentencePiece BPE (Llama 1/2) and tiktoken BPE (Llama 3/3.1), one interface for both.

    from model.tokenizer import load_tokenizer
    tok = load_tokenizer("../shared/data/tokenizers/llama3/tokenizer.model")   # or a directory holding it
    ids = tok.encode("Hello world", bos=True)      # special-token text in `text` stays plain text
    tok.decode(ids), tok.vocab_size, tok.stop_ids, tok.file_hash()

    from model.tokenizer import train_sentencepiece                   # a small Llama-style tokenizer
    path = train_sentencepiece(texts=lines, output_prefix="runs/tok/tok1k", vocab_size=1000)

Both implementations follow Meta's reference ``tokenizer.py`` token for token (llama ``Tokenizer`` wraps
``SentencePieceProcessor.encode``; llama3 ``Tokenizer`` wraps a ``tiktoken.Encoding`` built from the ranks file,
256 special tokens and Meta's split regex, and chunks very long inputs before tiktoken the same way).
Tests: ``pytest tests/unit/test_tokenizer.py tests/parity/test_tokenizer_parity.py``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm
import tiktoken

log = logging.getLogger(__name__)

# Meta llama3 tokenizer.py `pat_str`, verbatim (SOURCES.md prints it with table-escaped `\|`).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_BASE_TOKENS = 128_000
LLAMA3_NUM_SPECIAL_TOKENS = 256


def _llama3_special_names() -> list[str]:
    """The 256 special-token names in id order: Llama 3 names, with Llama 3.1's ``<|eom_id|>`` (offset 8) and
    ``<|python_tag|>`` (offset 10) in place of reserved 4 and 5. Reserved tokens keep their Llama 3 numbers
    (3.1 renumbers them and names 128004 ``<|finetune_right_pad_id|>``; the ids are what matter)."""
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(6, 6 + LLAMA3_NUM_SPECIAL_TOKENS - len(names))]
    return names


LLAMA3_SPECIAL_TOKENS: dict[str, int] = {
    name: LLAMA3_NUM_BASE_TOKENS + k for k, name in enumerate(_llama3_special_names())
}

# Meta llama3 Tokenizer.encode limits: tiktoken is slow (quadratic) on huge runs without a split point.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
_LONG_RUN_RE = re.compile(rf"\s{{{MAX_NO_WHITESPACES_CHARS + 1},}}|\S{{{MAX_NO_WHITESPACES_CHARS + 1},}}")  # \s == isspace
_TIKTOKEN_LINE_RE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+\r?$")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the project codes against; both implementations below satisfy it."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False
    ) -> list[list[int]]: ...
    def id_to_piece(self, i: int) -> str: ...
    def piece_to_id(self, piece: str) -> int: ...
    def file_hash(self) -> str: ...


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"encode() takes one str, got {type(text).__name__}; use encode_batch() for many")
    return text


class SentencePieceTokenizer:
    """Llama 1/2: Meta's ``Tokenizer`` (llama/tokenizer.py) over ``sentencepiece.SentencePieceProcessor``.

    ``pad_id``: the model file's pad id if it has one, else ``<unk>`` (0). Llama 2 has no pad piece
    (``pad_id=-1``); ``<unk>`` never occurs in real encodings thanks to byte fallback, so padded positions
    cannot be confused with a real ``</s>`` (padding with eos would break "ids != pad" masks).
    """

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: cannot load as a SentencePiece model ({e})") from e
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{self.path}: SentencePiece model has no bos/eos piece (bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}); Llama needs both: retrain with bos_id=1 eos_id=2"
            )
        self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.unk_id
        self.stop_ids: tuple[int, ...] = (self.eos_id,)
        self._hash: str | None = None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        # Control pieces (<s>, </s>) are never matched in input text by sentencepiece: no injection possible.
        return self._sp.encode(_check_text(text), add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        texts = [_check_text(t) for t in texts]
        return self._sp.encode(texts, add_bos=bos, add_eos=eos) if texts else []

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        try:
            return self._sp.decode(ids)
        except IndexError as e:
            raise ValueError(f"decode: id out of range [0, {self.vocab_size}) in {self.path}: {e}") from e

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"id {i} out of range [0, {self.vocab_size}) for {self.path}")
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if i == self.unk_id and piece != self._sp.id_to_piece(self.unk_id):
            raise KeyError(f"piece {piece!r} is not in the vocabulary of {self.path}")
        return i

    def file_hash(self) -> str:
        if self._hash is None:
            self._hash = _sha256(self.path)
        return self._hash

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable char table (what HF shows as pieces, e.g. ' the' -> 'Ġthe')."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file ('<base64 token> <rank>' per line); errors name the file and the line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected 2 fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(
                    f"{path}:{lineno}: not a tiktoken ranks line (expected '<base64 token> <rank>'): "
                    f"{line[:80]!r} ({e})"
                ) from e
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: tiktoken ranks must be unique and cover 0..{len(ranks) - 1}")
    return ranks


class Llama3Tokenizer:
    """Llama 3/3.1: Meta's llama3 ``Tokenizer`` (tiktoken BPE + 256 specials + split regex).

    Special ids are ``len(ranks) + k`` (128000..128255 for the official file, see ``LLAMA3_SPECIAL_TOKENS``).
    ``encode`` treats special-token text in the input as plain text (Meta's default ``allowed_special=set(),
    disallowed_special=()``); ``encode_with_special`` / ``allow_special=True`` parses it, for templates only.
    ``pad_id`` is 128004 (offset 4), Llama 3.1's ``<|finetune_right_pad_id|>``: an id that never appears in
    real text, unlike ``<|end_of_text|>``. ``id_to_piece`` returns GPT-2 byte-level strings (as HF does).
    """

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        ranks = _load_tiktoken_ranks(self.path)
        n_base = len(ranks)
        self.special_tokens: dict[str, int] = {
            name: n_base + k for k, name in enumerate(_llama3_special_names())
        }
        self._enc = tiktoken.Encoding(
            name=self.path.stem, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size: int = n_base + LLAMA3_NUM_SPECIAL_TOKENS
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = n_base + 4
        self.stop_ids: tuple[int, ...] = (self.eos_id, self.eot_id, self.eom_id)
        self._id_to_bytes: list[bytes] = [b""] * n_base
        for token, rank in ranks.items():
            self._id_to_bytes[rank] = token
        self._ranks = ranks
        self._id_to_special = {i: name for name, i in self.special_tokens.items()}
        self._byte_enc = _bytes_to_unicode()
        self._byte_dec = {c: b for b, c in self._byte_enc.items()}
        self._hash: str | None = None

    @staticmethod
    def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
        """Meta's splitter, verbatim: no piece holds more than ``max_len`` consecutive (non-)whitespace chars."""
        current_slice_len = 0
        current_slice_is_space = s[0].isspace() if len(s) > 0 else False
        slice_start = 0
        for i in range(len(s)):
            is_now_space = s[i].isspace()
            if current_slice_is_space ^ is_now_space:
                current_slice_len = 1
                current_slice_is_space = is_now_space
            else:
                current_slice_len += 1
                if current_slice_len > max_len:
                    yield s[slice_start:i]
                    slice_start = i
                    current_slice_len = 1
        yield s[slice_start:]

    def _substrings(self, text: str) -> Iterator[str]:
        """Meta's chunking (<=400k chars, runs <=25k), with a fast path: Meta's per-char loop only yields
        more than one piece when some run exceeds the limit, so the loop runs only on such chunks."""
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]
            if len(chunk) > MAX_NO_WHITESPACES_CHARS and _LONG_RUN_RE.search(chunk):
                yield from self._split_whitespaces_or_nonwhitespaces(chunk, MAX_NO_WHITESPACES_CHARS)
            else:
                yield chunk
        if not text:
            yield text

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        _check_text(text)
        ids: list[int] = [self.bos_id] if bos else []
        for sub in self._substrings(text):
            if allow_special:
                ids.extend(self._enc.encode(sub, allowed_special="all", disallowed_special=()))
            else:
                ids.extend(self._enc.encode_ordinary(sub))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_special(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode with special-token text (``<|eot_id|>``...) mapped to its id: for trusted templates only."""
        return self.encode(text, bos=bos, eos=eos, allow_special=True)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        # Flatten every text's chunks into one multi-threaded tiktoken call, then regroup.
        subs: list[str] = []
        counts: list[int] = []
        for text in texts:
            parts = list(self._substrings(_check_text(text)))
            subs.extend(parts)
            counts.append(len(parts))
        flat = self._enc.encode_ordinary_batch(subs, num_threads=min(8, os.cpu_count() or 1)) if subs else []
        out: list[list[int]] = []
        pos = 0
        for n in counts:
            ids = [self.bos_id] if bos else []
            for part in flat[pos : pos + n]:
                ids.extend(part)
            if eos:
                ids.append(self.eos_id)
            out.append(ids)
            pos += n
        return out

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self._enc.decode([int(i) for i in ids])  # errors="replace", as Meta's
        except KeyError as e:
            raise ValueError(f"decode: id {e} out of range [0, {self.vocab_size}) for {self.path}") from e

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if i in self._id_to_special:
            return self._id_to_special[i]
        if not 0 <= i < len(self._id_to_bytes):
            raise ValueError(f"id {i} out of range [0, {self.vocab_size}) for {self.path}")
        return "".join(self._byte_enc[b] for b in self._id_to_bytes[i])

    def piece_to_id(self, piece: str) -> int:
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        try:
            return self._ranks[bytes(self._byte_dec[c] for c in piece)]
        except KeyError:
            raise KeyError(
                f"piece {piece!r} is not in {self.path} (pieces are GPT-2 byte-level strings, e.g. 'Ġthe')"
            ) from None

    def file_hash(self) -> str:
        if self._hash is None:
            self._hash = _sha256(self.path)
        return self._hash

    def __repr__(self) -> str:
        return f"Llama3Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


_EXPECTED = (
    "expected a SentencePiece model (protobuf, e.g. Llama 2's tokenizer.model) or a tiktoken BPE ranks file "
    "('<base64 token> <rank>' per line, e.g. Llama 3's tokenizer.model)"
)


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer | Llama3Tokenizer:
    """Load a tokenizer file (or a directory holding ``tokenizer.model``), sniffing its format."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} ({_EXPECTED})")
    with open(path, "rb") as f:
        first_line = f.readline(4096)
    if not first_line:
        raise ValueError(f"{path}: empty file; {_EXPECTED}")
    if _TIKTOKEN_LINE_RE.match(first_line.rstrip(b"\n")):
        return Llama3Tokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except ValueError as e:
        raise ValueError(f"{path}: not a tokenizer file; {_EXPECTED}. Loader said: {e.__cause__ or e}") from e


def _sentences(texts: Iterable[str], max_bytes: int, stats: dict[str, int]) -> Iterator[str]:
    """One training sentence per non-empty line; lines over ``max_bytes`` are cut (at a space when
    possible) instead of being silently skipped by the trainer."""
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            stats["lines"] += 1
            if len(line.encode("utf-8")) <= max_bytes:
                yield line
                continue
            stats["cut"] += 1
            while line:
                cut = min(len(line), max_bytes)
                while len(line[:cut].encode("utf-8")) > max_bytes:
                    cut -= max(1, (len(line[:cut].encode("utf-8")) - max_bytes) // 4)
                space = line.rfind(" ", 1, cut)
                if cut < len(line) and space > cut // 2:
                    cut = space
                yield line[:cut]
                line = line[cut:]


LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe", shuffle_input_sentence=True, max_sentencepiece_length=16, split_digits=True,
    byte_fallback=True, split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
    treat_whitespace_as_suffix=False, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    vocabulary_output_piece_score=True, hard_vocab_limit=True, self_test_sample_size=0,
)
"""The SentencePiece trainer and normalizer settings stored in Meta's Llama 2 ``tokenizer.model`` (read with
sentencepiece's ``ModelProto``); ``train_sentencepiece`` adds the size, coverage and input settings."""


def train_sentencepiece(
    *,
    texts: Iterable[str],
    output_prefix: str | Path,
    vocab_size: int,
    character_coverage: float = 0.99995,
    input_sentence_size: int = 0,
    max_sentence_length: int = 4192,
    num_threads: int = 2,
    seed: int = 0,
    verbose: bool = False,
) -> Path:
    """Train a SentencePiece BPE model the Llama way and return the path of ``{output_prefix}.model``.

    Trainer and normalizer settings are those stored in Meta's Llama 2 ``tokenizer.model`` (read with
    sentencepiece's ``ModelProto``): BPE, digits split, byte fallback, ``<unk>``=0 ``<s>``=1 ``</s>``=2, no pad,
    identity normalization (no NFKC), dummy prefix, extra whitespace kept, whitespace-only pieces allowed,
    character coverage 0.99995, pieces up to 16 chars. Texts are streamed; each line is one sentence.
    ``input_sentence_size=0`` uses every sentence (no sampling), which with ``seed`` makes runs repeatable.
    Tiny vocabularies need ``vocab_size >= 259 + distinct characters kept``; lower ``character_coverage``
    (the rest falls back to bytes) if the trainer says the vocabulary is too small.
    """
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    stats = {"lines": 0, "cut": 0}
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts, max_sentence_length, stats),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads,
            minloglevel=0 if verbose else 2,
            **LLAMA2_TRAINER_SETTINGS,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training for {prefix}.model failed (vocab_size={vocab_size}, "
            f"character_coverage={character_coverage}, {stats['lines']} lines): {e}"
        ) from e
    if stats["lines"] == 0:
        raise ValueError(f"train_sentencepiece({prefix}): no non-empty lines in `texts`")
    if stats["cut"]:
        log.warning("train_sentencepiece: %d of %d lines longer than %d bytes were cut into pieces",
                    stats["cut"], stats["lines"], max_sentence_length)
    return Path(f"{prefix}.model")
