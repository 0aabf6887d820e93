"""Alignment data files -> train / held-out records: format sniffing, the shared hash split, prompts.

    from rlhf.sources import load_pairs, load_dialogues, load_prompts
    split = load_pairs(path, is_safety=True, valid_fraction=0.1, seed="llama-rlhf-split-v1")
    split.train, split.valid, split.report          # PreferencePair lists and the reader's ReadReport
    prompts, report = load_prompts(path, side="valid")   # ``Prompt`` s: the one prompt type of every stage

Three file formats, told apart by the first JSON object of the file (``sniff_format``):

- ``dialogues``: ``{"messages": [{"role", "content"}, ...], "system"?, "date"?}`` (``rlhf.data``);
- ``preferences``: ``{"prompt", "chosen", "rejected", "rating"?, "is_safety"?}``;
- ``hh``: Anthropic HH-RLHF ``{"chosen", "rejected"}`` transcripts.

Every stage splits with the same key, so a prompt held out from the reward models is also held out from SFT
and from rejection sampling: for a preference pair (either format) the key is its whole prompt
(``rlhf.data.prompt_text``), and an SFT dialogue made from a pair (prompt + chosen answer) is split as that
pair. Dialogue files are split on their opening (system + first user turn), ``rlhf.data``'s convention.
Nothing is dropped silently: the readers' ``ReadReport`` s travel with the records.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from rlhf.data import (
    Dialogue,
    PreferencePair,
    ReadReport,
    prompt_text,
    read_dialogues_jsonl,
    read_hh_rlhf,
    read_preferences_jsonl,
    split_by_hash,
)
from train.config_reader import ConfigError

FORMATS = ("dialogues", "preferences", "hh")
T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """A prompt to answer: the turns so far (ending with a user turn), whether it is safety-tagged, which side of
    the hash split it is on and, in a PPO prompt set, its index and chat-encoded token ids."""

    turns: list[dict[str, str]] = field(default_factory=list)
    system: str | None = None
    is_safety: bool = False
    """Llama 2's IS_SAFETY(p): the prompt is tagged as possibly eliciting unsafe answers."""
    source: str = ""
    id: str = ""
    """Stable over runs: a hash of the prompt text (rejection-sampling rounds are matched on it)."""
    heldout_side: bool = True
    """On the held-out side of the hash split (no reward model trained on it): PPO holds out only these."""
    index: int = -1
    """Global index in a PPO prompt set (seeds its answers; stable across data-parallel layouts)."""
    ids: tuple[int, ...] = ()
    """Chat-formatted token ids ending where the answer starts (PPO; rejection sampling encodes its own)."""

    @property
    def text(self) -> str:
        """The last turn's text (the question being asked)."""
        return self.turns[-1]["content"] if self.turns else ""


@dataclass
class Split(Generic[T]):
    """The two sides of one file, and what its reader did."""

    path: Path
    train: list[T]
    valid: list[T]
    report: ReadReport
    format: str
    capped_from: int | None = None
    """Records the file had before ``max_records`` kept only the first ones (None when not capped)."""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        cap = f" (first {len(self.train) + len(self.valid)} of {self.capped_from} records)" if self.capped_from else ""
        return (f"{self.path} [{self.format}]: {len(self.train)} train / {len(self.valid)} held out{cap}; "
                f"reader: {self.report}")

    def to_dict(self) -> dict[str, Any]:
        """For ``data_report.json``: the counts, and every skip reason with its first examples (file, line)."""
        return {"path": str(self.path), "format": self.format, "train": len(self.train), "valid": len(self.valid),
                "capped_from": self.capped_from, **report_dict(self.report), "notes": list(self.notes)}


def report_dict(report: ReadReport) -> dict[str, Any]:
    """A reader's ``ReadReport`` as JSON: read, kept, skipped by reason, repaired, and the example skips."""
    return {"read": report.read, "kept": report.kept, "skipped": dict(report.skipped),
            "repaired": dict(report.repaired), "skip_examples": [dataclasses.asdict(e) for e in report.examples]}


def dataset_name(path: str | Path) -> str:
    """A short name for a data file: its directory for ``test.*`` / ``train.*`` files (HH-RLHF's
    ``helpful-base/test.jsonl.gz`` -> "helpful-base"), else the file name without its extensions."""
    p = Path(path)
    stem = p.name.split(".")[0]
    return p.parent.name if stem in ("test", "train", "valid", "data") and p.parent.name else stem


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """``dataset_name`` of each path, with "-2", "-3", ... appended to repeats."""
    seen: dict[str, int] = {}
    out = []
    for path in paths:
        name = dataset_name(path)
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def sniff_format(path: str | Path) -> str:
    """The format of a JSONL(.gz) file from its first JSON object (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if "messages" in obj:
                return "dialogues"
            if "prompt" in obj and "chosen" in obj:
                return "preferences"
            if "chosen" in obj and "rejected" in obj:
                return "hh"
            raise ConfigError(f"{path}:{lineno}: cannot tell the format from fields {sorted(obj)}; expected "
                              "\"messages\" (dialogues), \"prompt\"+\"chosen\"+\"rejected\" (preference pairs) or "
                              "\"chosen\"+\"rejected\" HH-RLHF transcripts")
            if lineno > 1000:
                break
    raise ConfigError(f"{path}: no JSON object in its first lines; expected JSONL records")


def _cap(records: list[T], max_records: int) -> tuple[list[T], int | None]:
    if max_records and len(records) > max_records:
        return records[:max_records], len(records)
    return records, None


def read_pairs(path: str | Path, *, is_safety: bool) -> tuple[list[PreferencePair], ReadReport, str]:
    """Preference pairs of a ``preferences`` or ``hh`` file (a dialogue file is refused, naming the fix)."""
    fmt = sniff_format(path)
    if fmt == "hh":
        pairs, report = read_hh_rlhf(path, is_safety=is_safety)
    elif fmt == "preferences":
        pairs, report = read_preferences_jsonl(path, default_is_safety=is_safety)
    else:
        raise ConfigError(f"{path}: holds dialogues (\"messages\"), not preference pairs; reward models need "
                          "{\"prompt\", \"chosen\", \"rejected\"} records or HH-RLHF transcripts")
    return pairs, report, fmt


def load_pairs(path: str | Path, *, is_safety: bool, valid_fraction: float, seed: str,
               max_records: int = 0) -> Split[PreferencePair]:
    """Pairs of one file, split by the hash of their prompt."""
    pairs, report, fmt = read_pairs(path, is_safety=is_safety)
    pairs, capped = _cap(pairs, max_records)
    train, valid = split_by_hash(pairs, key=prompt_text, valid_fraction=valid_fraction, seed=seed)
    return Split(Path(path), train, valid, report, fmt, capped)


def pair_to_dialogue(pair: PreferencePair) -> Dialogue:
    """The chosen dialogue of a pair (prompt turns + the chosen answer): SFT data from preference data."""
    return Dialogue(messages=[*pair.prompt, {"role": "assistant", "content": pair.chosen}], system=None,
                    date=None, source=pair.source, id=pair.id)


def load_dialogues(path: str | Path, *, valid_fraction: float, seed: str,
                   max_records: int = 0) -> Split[Dialogue]:
    """SFT dialogues of one file: dialogue records as they are, preference records as their chosen dialogue."""
    fmt = sniff_format(path)
    if fmt == "dialogues":
        dialogues, report = read_dialogues_jsonl(path)
        dialogues, capped = _cap(dialogues, max_records)
        train, valid = split_by_hash(dialogues, key=prompt_text, valid_fraction=valid_fraction, seed=seed)
        return Split(Path(path), train, valid, report, fmt, capped)
    pairs = load_pairs(path, is_safety=False, valid_fraction=valid_fraction, seed=seed, max_records=max_records)
    return Split(Path(path), [pair_to_dialogue(p) for p in pairs.train], [pair_to_dialogue(p) for p in pairs.valid],
                 pairs.report, fmt, pairs.capped_from, ["dialogues = prompt + chosen answer of each pair"])


def prompt_id(turns: Sequence[dict[str, str]], system: str | None = None) -> str:
    text = (system or "") + "\0" + "\n".join(f"{t['role']}: {t['content']}" for t in turns)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def hh_files(root: str | Path) -> list[tuple[Path, bool]]:
    """``(file, is_safety)`` of an HH-RLHF directory: ``helpful-base/*.jsonl[.gz]`` (helpfulness) and
    ``harmless-base/*.jsonl[.gz]`` (safety-flagged)."""
    files = []
    for sub, is_safety in (("helpful-base", False), ("harmless-base", True)):
        files += [(p, is_safety) for p in sorted((Path(root) / sub).glob("*.jsonl*"))]
    if not files:
        raise ConfigError(f"{root}: no helpful-base/*.jsonl[.gz] or harmless-base/*.jsonl[.gz] files (HH-RLHF)")
    return files


def load_prompts(path: str | Path, *, side: str, valid_fraction: float = 0.1, seed: str = "llama-rlhf-split-v1",
                 is_safety: bool = False, max_records: int = 0) -> tuple[list[Prompt], ReadReport]:
    """Prompts of one file's ``side`` ("train", "valid" or "all"): a pair's prompt, or a dialogue up to (not
    including) its last assistant turn, each marked with its side (``heldout_side``). Duplicate prompts (several
    pairs per prompt) are kept once. The defaults are the split every stage trains with (``rlhf.data``)."""
    if side not in ("train", "valid", "all"):
        raise ValueError(f"side={side!r}: use \"train\", \"valid\" or \"all\"")
    fmt = sniff_format(path)
    records: list[Any]
    if fmt == "dialogues":
        records, report = read_dialogues_jsonl(path, require_final_assistant=False)
    else:
        records, report, _ = read_pairs(path, is_safety=is_safety)
    records, _ = _cap(records, max_records)
    train, valid = split_by_hash(records, key=prompt_text, valid_fraction=valid_fraction, seed=seed)
    held = {id(r) for r in valid}
    chosen = records if side == "all" else train if side == "train" else valid
    prompts: list[Prompt] = []
    for r in chosen:
        if fmt == "dialogues":
            turns = r.messages[:-1] if r.messages[-1]["role"] == "assistant" else r.messages
            system, safety = r.system, is_safety
        else:
            turns, system, safety = r.prompt, None, r.is_safety
        prompts.append(Prompt(turns, system, safety, r.source, prompt_id(turns, system), heldout_side=id(r) in held))
    seen: set[str] = set()
    unique = [p for p in prompts if not (p.id in seen or seen.add(p.id))]  # type: ignore[func-returns-value]
    return unique, report
