"""Readers and splits for the alignment stage's data: dialogues (SFT, GAtt, PPO prompts) and preference pairs
(reward models), including Anthropic HH-RLHF.

    from rlhf.data import read_hh_rlhf, split_by_hash, helpfulness_rm_mixture
    pairs, report = read_hh_rlhf("hh-rlhf/helpful-base/test.jsonl.gz", is_safety=False)
    print(report)                       # read / kept / skipped by reason, with file:line examples
    train, valid = split_by_hash(pairs, valid_fraction=0.1)

No record is ever dropped silently: every reader returns ``(records, ReadReport)`` and the report counts each
skipped line by reason (bad JSON, missing field, bad role, empty text, unknown rating, invalid UTF-8, a corrupt
gzip member, ...) with the file and line of the first few. Readers raise only for a missing file. Files may be
plain ``.jsonl`` or gzip-compressed (``.gz``). Tests: ``pytest tests/unit/test_rlhf_data.py``.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import random
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# Llama 2 graded preference ratings (the margin tables in rlhf/losses.py use the same names).
RATINGS: tuple[str, ...] = (
    "significantly_better",
    "better",
    "slightly_better",
    "negligibly_better",
    "unsure",
)
ROLES: tuple[str, ...] = ("user", "assistant")
MAX_EXAMPLES_PER_REASON = 3

T = TypeVar("T")


@dataclass
class Dialogue:
    """A chat: alternating ``{"role": "user"|"assistant", "content": str}`` messages starting with a user turn."""

    messages: list[dict[str, str]]
    system: str | None
    date: str | None
    source: str
    id: str


@dataclass
class PreferencePair:
    """Two answers to the same prompt. ``prompt`` is the shared dialogue prefix and ends with a user turn."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    rating: str | None
    is_safety: bool
    source: str
    id: str


@dataclass(frozen=True)
class Skip:
    """Where a record was skipped and why (``detail`` says what exactly was wrong)."""

    file: str
    line: int
    reason: str
    detail: str = ""


@dataclass
class ReadReport:
    """What a reader did: ``read == kept + sum(skipped.values())``.

    ``skipped`` counts by reason; ``examples`` holds the first ``MAX_EXAMPLES_PER_REASON`` ``Skip`` of each
    reason (file, line, reason, detail); ``repaired`` counts quirks that were fixed without dropping anything
    (e.g. a doubled HH-RLHF speaker marker whose two turns were merged).
    """

    read: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[Skip] = field(default_factory=list)
    repaired: Counter[str] = field(default_factory=Counter)

    def skip(self, file: str | Path, line: int, reason: str, detail: str = "") -> None:
        """Count one skipped record (and keep it as an example if it is among the first of its reason)."""
        self.skipped[reason] += 1
        if self.skipped[reason] <= MAX_EXAMPLES_PER_REASON:
            self.examples.append(Skip(str(file), line, reason, detail))

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.read if self.read else 1.0

    def lines_for(self, reason: str) -> list[int]:
        """The line numbers of the recorded examples of ``reason``."""
        return [e.line for e in self.examples if e.reason == reason]

    def __str__(self) -> str:
        head = f"read {self.read}, kept {self.kept} ({100 * self.kept_fraction:.1f}%)"
        if self.skipped:
            head += ", skipped " + ", ".join(f"{r}={n}" for r, n in self.skipped.most_common())
        if self.repaired:
            head += "; repaired " + ", ".join(f"{r}={n}" for r, n in self.repaired.most_common())
        lines = [head] + [
            f"  {e.file}:{e.line}: {e.reason}" + (f" ({e.detail})" if e.detail else "") for e in self.examples
        ]
        return "\n".join(lines)


class RecordError(ValueError):
    """A record that cannot be used; ``reason`` is the report key, the message the detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------- JSON lines


def _iter_json_objects(path: str | Path, report: ReadReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each JSON-object line; count every other line in ``report``.

    Lines are read as bytes and decoded one by one, so a stray invalid UTF-8 byte costs one line. A corrupt or
    truncated gzip stream cannot be read past the damage: its unreadable remainder is counted as one skipped
    record (reason ``corrupt_gzip``) at the line where reading stopped; the lines before it are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    is_gz = path.suffix == ".gz"
    lineno = 0
    with gzip.open(path, "rb") if is_gz else path.open("rb") as fh:
        while True:
            try:
                raw = fh.readline()
            except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
                report.read += 1
                report.skip(
                    path, lineno + 1, "corrupt_gzip", f"{type(exc).__name__}: {exc}; rest of file lost"
                )
                return
            if not raw:
                return
            lineno += 1
            report.read += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.skip(path, lineno, "invalid_utf8", str(exc))
                continue
            if not text.strip():
                report.skip(path, lineno, "blank_line")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                report.skip(path, lineno, "bad_json", str(exc))
                continue
            if not isinstance(obj, dict):
                report.skip(path, lineno, "not_an_object", f"got a JSON {type(obj).__name__}")
                continue
            yield lineno, obj


def _read_records(
    path: str | Path, parse: Callable[[dict[str, Any], str], T], report: ReadReport | None = None
) -> tuple[list[T], ReadReport]:
    """Apply ``parse(obj, default_id)`` to every JSON object of ``path``; ``RecordError`` -> counted skip."""
    report = report if report is not None else ReadReport()
    records: list[T] = []
    for lineno, obj in _iter_json_objects(path, report):
        try:
            records.append(parse(obj, f"{Path(path).name}:{lineno}"))
        except RecordError as exc:
            report.skip(path, lineno, exc.reason, exc.detail)
            continue
        report.kept += 1
    return records, report


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    if name not in obj or obj[name] is None:
        if required:
            raise RecordError("missing_field", f"field {name!r} is missing")
        return None
    if not isinstance(obj[name], kind):
        raise RecordError("bad_field_type", f"field {name!r} is a {type(obj[name]).__name__}")
    return obj[name]


def _text(obj: dict[str, Any], name: str) -> str:
    value = _field(obj, name, str)
    if not value.strip():
        raise RecordError("empty_text", f"field {name!r} is empty")
    return value


def _messages(value: Any, name: str, *, final_role: str | None) -> list[dict[str, str]]:
    """Validate a list of chat messages: user/assistant, alternating from user, non-empty, ``final_role``."""
    if not isinstance(value, list) or not value:
        raise RecordError("bad_field_type", f"field {name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError("missing_field", f"{name}[{i}] needs 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise RecordError("bad_role", f"{name}[{i}].role is {role!r}; allowed {list(ROLES)}")
        if role != ROLES[i % 2]:
            raise RecordError(
                "bad_turn_order", f"{name}[{i}] is {role!r}; turns alternate starting with user"
            )
        if not isinstance(content, str) or not content.strip():
            raise RecordError("empty_text", f"{name}[{i}].content is empty or not a string")
        out.append({"role": role, "content": content})
    if final_role is not None and out[-1]["role"] != final_role:
        raise RecordError("bad_turn_order", f"{name} must end with a turn by the {final_role}")
    return out


def _rating(obj: dict[str, Any]) -> str | None:
    """The rating, normalised: case-insensitive, spaces/hyphens as underscores ("Slightly better" is fine)."""
    value = _field(obj, "rating", str, required=False)
    if value is None:
        return None
    norm = re.sub(r"[\s-]+", "_", value.strip().lower())
    if norm not in RATINGS:
        raise RecordError("unknown_rating", f"rating {value!r}; allowed {list(RATINGS)}")
    return norm


# --------------------------------------------------------------------------------------------------- readers


def read_dialogues_jsonl(
    path: str | Path, *, require_final_assistant: bool = True, source: str | None = None
) -> tuple[list[Dialogue], ReadReport]:
    """Read ``{"messages": [{"role", "content"}, ...], "system"?: str, "date"?: "YYYY-MM-DD", "id"?: str}``.

    A leading ``{"role": "system"}`` message is moved into ``Dialogue.system`` (skipped as ``bad_field_type``
    if a top-level "system" is also given). With ``require_final_assistant=False`` dialogues may end on a user
    turn (prompt sets for PPO or rejection sampling).
    """
    src = source or Path(path).name

    def parse(obj: dict[str, Any], default_id: str) -> Dialogue:
        messages = _field(obj, "messages", list)
        system = _field(obj, "system", str, required=False)
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            if system is not None:
                raise RecordError("bad_field_type", "both a top-level 'system' and a system message")
            system = messages[0].get("content")
            if not isinstance(system, str):
                raise RecordError("bad_field_type", "messages[0].content (system) is not a string")
            messages = messages[1:]
        msgs = _messages(messages, "messages", final_role="assistant" if require_final_assistant else None)
        date = _field(obj, "date", str, required=False)
        if date is not None:
            try:
                if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
                    raise ValueError(date)
                datetime.date.fromisoformat(date)
            except ValueError:
                raise RecordError("bad_date", f"date {date!r} is not YYYY-MM-DD") from None
        rid = _field(obj, "id", str, required=False) or default_id
        return Dialogue(messages=msgs, system=system, date=date, source=src, id=rid)

    return _read_records(path, parse)


def read_preferences_jsonl(
    path: str | Path, *, default_is_safety: bool = False, source: str | None = None
) -> tuple[list[PreferencePair], ReadReport]:
    """Read ``{"prompt": str | [messages], "chosen": str, "rejected": str, "rating"?: str, "is_safety"?: bool}``.

    A string prompt becomes one user turn; a message list must alternate from user and end with a user turn.
    ``rating`` is one of ``RATINGS`` (or absent/null); identical chosen/rejected texts are skipped.
    """
    src = source or Path(path).name

    def parse(obj: dict[str, Any], default_id: str) -> PreferencePair:
        prompt_value = _field(obj, "prompt", (str, list))
        if isinstance(prompt_value, str):
            if not prompt_value.strip():
                raise RecordError("empty_text", "field 'prompt' is empty")
            prompt = [{"role": "user", "content": prompt_value}]
        else:
            prompt = _messages(prompt_value, "prompt", final_role="user")
        chosen, rejected = _text(obj, "chosen"), _text(obj, "rejected")
        if chosen.strip() == rejected.strip():
            raise RecordError("identical_answers", "chosen and rejected are the same text")
        rating = _rating(obj)
        is_safety = _field(obj, "is_safety", bool, required=False)
        rid = _field(obj, "id", str, required=False) or default_id
        return PreferencePair(
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            rating=rating,
            is_safety=default_is_safety if is_safety is None else is_safety,
            source=src,
            id=rid,
        )

    return _read_records(path, parse)


# ------------------------------------------------------------------------------------------------- HH-RLHF

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_hh_rlhf(text: str, *, repaired: Counter[str] | None = None) -> list[dict[str, str]]:
    """Split an Anthropic transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into alternating turns.

    Quirks of the real data that are repaired (and counted in ``repaired`` when given): surrounding whitespace
    (stripped from the transcript and each turn), a first marker without its leading blank line, and doubled
    markers (two consecutive "Assistant:" or "Human:" turns, e.g. an answer containing a blank line followed
    by "Assistant:"), which are merged into one turn joined by a blank line. Markers not preceded by a blank
    line ("...?\\n\\nAssistant: Human: ...") are content, as in the original data.
    Raises ``RecordError`` (a ValueError) for a transcript that does not start with "Human:" or has an empty
    turn.
    """
    body = "\n\n" + text.strip()
    parts = _HH_MARKER.split(body)
    if parts[0].strip():
        raise RecordError("hh_no_human_start", f"text before the first marker: {parts[0][:40]!r}")
    if len(parts) < 3:
        raise RecordError("hh_no_markers", "no '\\n\\nHuman:' / '\\n\\nAssistant:' markers")
    turns: list[dict[str, str]] = []
    for marker, content in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _HH_ROLE[marker], content.strip()
        if turns and turns[-1]["role"] == role:
            if repaired is not None:
                repaired[f"hh_merged_doubled_{role}_marker"] += 1
            turns[-1]["content"] = (turns[-1]["content"] + "\n\n" + content).strip()
            continue
        turns.append({"role": role, "content": content})
    if turns[0]["role"] != "user":
        raise RecordError("hh_no_human_start", "the transcript starts with an Assistant turn")
    for i, t in enumerate(turns):
        if not t["content"]:
            raise RecordError("empty_text", f"turn {i} ({t['role']}) is empty")
    return turns


def _hh_pair(
    obj: dict[str, Any], default_id: str, *, is_safety: bool, source: str, repaired: Counter[str]
) -> PreferencePair:
    parsed = {}
    for name in ("chosen", "rejected"):
        try:
            parsed[name] = parse_hh_rlhf(_text(obj, name), repaired=repaired)
        except RecordError as exc:
            raise RecordError(exc.reason, f"{name}: {exc.detail}") from None
    chosen, rejected = parsed["chosen"], parsed["rejected"]
    for name, turns in parsed.items():
        if turns[-1]["role"] != "assistant" or len(turns) < 2:
            raise RecordError("hh_no_final_answer", f"{name} does not end with an Assistant answer")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("hh_prefix_mismatch", "chosen and rejected differ before their final answers")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RecordError("identical_answers", "chosen and rejected final answers are the same")
    return PreferencePair(
        prompt=chosen[:-1],
        chosen=chosen[-1]["content"],
        rejected=rejected[-1]["content"],
        rating=None,
        is_safety=is_safety,
        source=source,
        id=default_id,
    )


def read_hh_rlhf(
    path: str | Path, *, is_safety: bool, source: str | None = None
) -> tuple[list[PreferencePair], ReadReport]:
    """Read an HH-RLHF ``{"chosen", "rejected"}`` file (.jsonl or .jsonl.gz) into ``PreferencePair`` records.

    Both transcripts are parsed with ``parse_hh_rlhf``; the shared prefix (every turn up to and including the
    last Human turn) becomes ``prompt`` and the two final Assistant answers become chosen/rejected. Pairs
    whose prefixes differ, whose final answers are identical or that lack a final answer are skipped and
    counted. HH-RLHF has no graded ratings (``rating=None``); ``is_safety`` tags the whole file (True for
    harmless-base, False for helpful-base). ``source`` defaults to "hh-rlhf/<parent dir>".
    """
    path = Path(path)
    src = source or f"hh-rlhf/{path.parent.name}"
    report = ReadReport()

    def parse(obj: dict[str, Any], default_id: str) -> PreferencePair:
        return _hh_pair(
            obj,
            f"{src}:{default_id.rsplit(':', 1)[-1]}",
            is_safety=is_safety,
            source=src,
            repaired=report.repaired,
        )

    return _read_records(path, parse, report)


# -------------------------------------------------------------------------------------- splits and mixtures


def prompt_text(record: Any) -> str:
    """The text a record is split on: a pair's whole prompt; a dialogue's system + first user turn.

    Dialogues are keyed on their opening only so that continuations of one conversation stay together.
    """
    if isinstance(record, PreferencePair):
        turns = record.prompt
    elif isinstance(record, Dialogue):
        turns = [{"role": "system", "content": record.system or ""}] + record.messages[:1]
    elif isinstance(record, dict) and "prompt" in record:
        p = record["prompt"]
        turns = [{"role": "user", "content": p}] if isinstance(p, str) else p
    else:
        raise TypeError(f"no prompt text for a {type(record).__name__}: pass key=")
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


def split_by_hash(
    records: Sequence[T],
    *,
    key: Callable[[T], str] = prompt_text,
    valid_fraction: float = 0.1,
    seed: str = "llama-rlhf-split-v1",
) -> tuple[list[T], list[T]]:
    """Deterministic ``(train, valid)`` split: a record is in valid iff ``sha1(seed + key(record))`` falls in the
    lowest ``valid_fraction`` of the hash range.

    Records sharing a prompt (several answer pairs for one prompt) always land on the same side, the split is
    stable across runs, machines and Python versions, and adding records never moves existing ones. The valid
    share is ``valid_fraction`` in expectation, not exactly. Order within each side is preserved.
    """
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1], got {valid_fraction}")
    train: list[T] = []
    valid: list[T] = []
    for r in records:
        digest = hashlib.sha1(f"{seed}\0{key(r)}".encode()).digest()
        (valid if int.from_bytes(digest[:8], "big") < valid_fraction * 2.0**64 else train).append(r)
    return train, valid


def helpfulness_rm_mixture(
    helpful: Sequence[T], safety: Sequence[T], *, seed: int
) -> tuple[list[T], dict[str, int]]:
    """Llama 2 helpfulness-RM data: all helpfulness pairs + an equal number sampled from safety, shuffled.

    The paper samples the extra half from safety *and* open-source data; offline we only have safety data
    (HH-RLHF harmless), so it all comes from ``safety``, without replacement: if there are fewer safety pairs
    than helpfulness pairs, all of them are used (``counts["safety"] < counts["safety_requested"]``).
    Deterministic for a given ``seed``.
    """
    rng = random.Random(seed)
    n = min(len(helpful), len(safety))
    extra = rng.sample(list(safety), n)
    mix = list(helpful) + extra
    rng.shuffle(mix)
    return mix, {"helpful": len(helpful), "safety": n, "safety_requested": len(helpful), "total": len(mix)}


def safety_rm_mixture(
    safety: Sequence[T], helpful: Sequence[T], *, seed: int, safety_fraction: float = 0.9
) -> tuple[list[T], dict[str, int]]:
    """Llama 2 safety-RM data: all safety pairs + helpfulness pairs so that safety is ``safety_fraction`` of it.

    ``n_helpful = round(len(safety) * (1 - f) / f)`` sampled without replacement (capped by availability, in
    which case safety is a larger share than asked). Shuffled, deterministic for a given ``seed``.
    """
    if not 0.0 < safety_fraction <= 1.0:
        raise ValueError(f"safety_fraction must be in (0, 1], got {safety_fraction}")
    rng = random.Random(seed)
    wanted = round(len(safety) * (1.0 - safety_fraction) / safety_fraction)
    n = min(wanted, len(helpful))
    extra = rng.sample(list(helpful), n)
    mix = list(safety) + extra
    rng.shuffle(mix)
    return mix, {"safety": len(safety), "helpful": n, "helpful_requested": wanted, "total": len(mix)}


def rating_buckets(records: Sequence[Any]) -> dict[str, list[int]]:
    """Indices grouped by rating (records with ``.rating`` or plain rating strings); None -> "unrated".

    For per-rating accuracy as in Llama 2 Table 8. Keys follow ``RATINGS`` order, then "unrated".
    """
    buckets: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        rating = r if r is None or isinstance(r, str) else r.rating
        buckets[rating if rating is not None else "unrated"].append(i)
    order = {name: k for k, name in enumerate((*RATINGS, "unrated"))}
    return dict(sorted(buckets.items(), key=lambda kv: order.get(kv[0], len(order))))
