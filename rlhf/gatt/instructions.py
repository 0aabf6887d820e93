"""Ghost Attention instructions (Llama 2 sec. 3.3) and the programmatic checkers that measure adherence.

    from rlhf.gatt.instructions import sample_instruction, load_instructions, Instruction, Check
    rng = random.Random(0)
    inst = sample_instruction(rng)                       # e.g. "Act as Napoleon. Speak in French."
    inst.text, inst.short, inst.checks                   # short form: "Figure: Napoleon. Language: French"
    inst.adheres("Je suis l'empereur des Francais.")     # every check passes -> True
    custom = load_instructions("my_instructions.jsonl")  # {"text", "short"?, "checks": ["ends_with:moon", ...]}

The lists below were written for this project (not copied from the paper, which gives only the categories
and the examples "Tennis", "French", "Napoleon"). A sampled instruction is a random combination of one to
``max_attributes`` categories; with probability ``shorten_probability`` (Llama 2: half the time) it is given
in the shortened form ("Figure: Napoleon"), and GAtt trains on both.

Checkers (``Check(kind, value)``), each a function of the answer text alone:

- ``language:CODE``: py3langid (installed; its model ships in the wheel) classifies the answer as CODE.
- ``keyword:W1|W2|...``: one of the words occurs (case-insensitive, whole words) - hobby and persona checks
  use the hobby's / figure's own keywords (a tennis fan mentions rackets, Napoleon mentions his empire).
- ``ends_with:WORD``: the last word of the answer (punctuation stripped) is WORD.
- ``uppercase``: the answer has letters and none is lower case.
- ``module:function``: a user-given checker ``function(answer: str) -> bool``.
"""

from __future__ import annotations

import importlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOBBIES: dict[str, tuple[str, ...]] = {
    "tennis": ("tennis", "racket", "serve", "court", "match"),
    "chess": ("chess", "board", "pawn", "knight", "checkmate"),
    "gardening": ("garden", "plant", "soil", "flower", "seed"),
    "painting": ("paint", "canvas", "brush", "colour", "color"),
    "cycling": ("bike", "cycling", "ride", "pedal", "wheel"),
    "baking": ("bake", "bread", "oven", "cake", "dough"),
    "birdwatching": ("bird", "binoculars", "feather", "nest", "wing"),
    "astronomy": ("star", "planet", "telescope", "moon", "galaxy"),
    "sailing": ("sail", "boat", "wind", "harbour", "sea"),
    "photography": ("photo", "camera", "lens", "picture", "shot"),
    "hiking": ("hike", "trail", "mountain", "boots", "summit"),
    "knitting": ("knit", "wool", "yarn", "needle", "scarf"),
}
LANGUAGES: dict[str, str] = {
    "French": "fr", "Spanish": "es", "German": "de", "Italian": "it", "Portuguese": "pt", "Dutch": "nl",
    "Swedish": "sv", "Polish": "pl", "Turkish": "tr", "Indonesian": "id",
}
PUBLIC_FIGURES: dict[str, tuple[str, ...]] = {
    "Napoleon": ("napoleon", "emperor", "france", "army", "empire"),
    "Marie Curie": ("curie", "radium", "polonium", "laboratory", "science"),
    "Albert Einstein": ("einstein", "relativity", "physics", "theory", "light"),
    "Cleopatra": ("cleopatra", "egypt", "nile", "queen", "pharaoh"),
    "Leonardo da Vinci": ("leonardo", "vinci", "painting", "invention", "florence"),
    "Ada Lovelace": ("lovelace", "engine", "babbage", "program", "mathematics"),
    "William Shakespeare": ("shakespeare", "play", "stage", "sonnet", "globe"),
    "Nelson Mandela": ("mandela", "freedom", "africa", "justice", "nation"),
    "Frida Kahlo": ("frida", "kahlo", "painting", "mexico", "colour"),
    "Isaac Newton": ("newton", "gravity", "apple", "motion", "laws"),
}
CATEGORIES = ("hobby", "language", "figure")


@dataclass(frozen=True)
class Check:
    """One programmatic test of an answer (see the module docstring for the kinds)."""

    kind: str
    value: str = ""

    @classmethod
    def parse(cls, spec: str) -> Check:
        kind, _, value = spec.partition(":")
        check = cls(kind, value)
        check.function()  # fail early on an unknown kind or an unimportable module
        return check

    def function(self) -> Callable[[str], bool]:
        k, v = self.kind, self.value
        if k == "language":
            return lambda answer: detect_language(answer) == v
        if k == "keyword":
            words = [w.lower() for w in v.split("|") if w]
            return lambda answer: any(re.search(rf"\b{re.escape(w)}", answer.lower()) for w in words)
        if k == "ends_with":
            return lambda answer: last_word(answer) == v.lower()
        if k == "uppercase":
            return lambda answer: any(c.isalpha() for c in answer) and answer == answer.upper()
        if k and v.isidentifier():  # module:function
            try:
                return getattr(importlib.import_module(k), v)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"unknown checker {k}:{v}: not a built-in kind and not an importable "
                                 f"module:function ({err})") from None
        raise ValueError(f"unknown checker {k!r}: use language:CODE, keyword:W1|W2, ends_with:WORD, uppercase or "
                         "module:function")

    def __call__(self, answer: str) -> bool:
        return bool(self.function()(answer))

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}" if self.value else self.kind


@dataclass(frozen=True)
class Instruction:
    text: str
    """The long form, attached to user messages."""
    short: str = ""
    """The shortened form ("Figure: Napoleon"); "" when it has none."""
    checks: tuple[Check, ...] = field(default_factory=tuple)
    """All must pass for an answer to adhere."""

    def adheres(self, answer: str) -> bool:
        return all(check(answer) for check in self.checks)

    def to_dict(self) -> dict:
        return {"text": self.text, "short": self.short, "checks": [str(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, d: dict) -> Instruction:
        if not isinstance(d.get("text"), str) or not d["text"].strip():
            raise ValueError(f"instruction {d!r}: needs a non-empty 'text'")
        return cls(text=d["text"], short=d.get("short", ""), checks=tuple(Check.parse(s) for s in d.get("checks", [])))


def detect_language(text: str) -> str:
    """ISO 639-1 code of the language py3langid finds in ``text``."""
    import py3langid

    return str(py3langid.classify(text)[0])


def last_word(text: str) -> str:
    words = re.findall(r"[\w']+", text.lower())
    return words[-1] if words else ""


def _attribute(category: str, rng: random.Random) -> tuple[str, str, Check]:
    """(long text, short text, check) of one random attribute of ``category``."""
    if category == "hobby":
        hobby = rng.choice(sorted(HOBBIES))
        return f"You enjoy {hobby}.", f"Hobby: {hobby}", Check("keyword", "|".join(HOBBIES[hobby]))
    if category == "language":
        language = rng.choice(sorted(LANGUAGES))
        return f"Speak in {language}.", f"Language: {language}", Check("language", LANGUAGES[language])
    if category == "figure":
        figure = rng.choice(sorted(PUBLIC_FIGURES))
        return f"Act as {figure}.", f"Figure: {figure}", Check("keyword", "|".join(PUBLIC_FIGURES[figure]))
    raise ValueError(f"unknown instruction category {category!r}; choose from {CATEGORIES}")


def sample_instruction(rng: random.Random, *, categories: Sequence[str] = CATEGORIES, max_attributes: int = 2,
                       shorten_probability: float = 0.5) -> Instruction:
    """A random combination of 1..``max_attributes`` categories, shortened with ``shorten_probability``."""
    k = rng.randint(1, min(max_attributes, len(categories)))
    chosen = rng.sample(list(categories), k)
    parts = [_attribute(c, rng) for c in chosen]
    long_text = " ".join(p[0] for p in parts)
    short_text = ". ".join(p[1] for p in parts)
    checks = tuple(p[2] for p in parts)
    text = short_text if rng.random() < shorten_probability else long_text
    return Instruction(text=text, short=short_text, checks=checks)


def load_instructions(path: str | Path) -> list[Instruction]:
    """User-given instructions: a JSONL (or JSON list) of ``{"text", "short"?, "checks": [spec, ...]}``."""
    raw = Path(path).read_text()
    try:
        items = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(x) for x in raw.splitlines()
                                                                       if x.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON / JSONL: {err}") from None
    out = []
    for i, item in enumerate(items):
        try:
            out.append(Instruction.from_dict(item))
        except ValueError as err:
            raise ValueError(f"{path}: record {i + 1}: {err}") from None
    if not out:
        raise ValueError(f"{path}: no instructions")
    return out
