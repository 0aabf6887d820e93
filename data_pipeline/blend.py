"""Mixtures of prepared sources: weights, the Llama 1 preset, megatron blends and an epochs report.

    from data_pipeline.blend import MixtureSpec, llama1_preset, epochs_report, format_epochs_table
    spec = MixtureSpec.from_weights("runs/data", {"cc": 0.67, "c4": 0.15, "wiki": 0.18})
    spec = llama1_preset({"commoncrawl": "runs/data/cc", "c4": "runs/data/c4", "wikipedia": "runs/data/wiki"})
    print(format_epochs_table(epochs_report(spec, token_budget=1.4e12)))

A ``MixtureSpec`` is a list of (name, weight, megatron prefix, tokens). ``megatron_blend()`` gives the
``(prefixes, weights)`` pair that ``BlendedMegatronDatasetConfig.blend`` takes. A spec can also be read from
JSON: ``{"sources": {"cc": {"weight": 0.67, "prefix": "runs/data/cc"}, ...}}`` (``prefix`` relative to the
JSON file; or ``"data": DIR`` + ``"source": NAME`` to look it up in DIR's manifest).

The Llama 1 preset (Touvron et al. 2023, Table 1) lists seven sources; when some are not prepared,
``llama1_preset`` drops them and renormalises the others (CommonCrawl 67 : C4 15 : Wikipedia 4.5 stays in
proportion) unless ``strict=True``; the dropped share is reported in ``MixtureSpec.notes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# name: (sampling proportion, epochs over 1.4T tokens, disk size) from the Llama 1 paper, Table 1.
LLAMA1_MIXTURE: dict[str, tuple[float, float, str]] = {
    "commoncrawl": (0.670, 1.10, "3.3 TB"),
    "c4": (0.150, 1.06, "783 GB"),
    "github": (0.045, 0.64, "328 GB"),
    "wikipedia": (0.045, 2.45, "83 GB"),
    "books": (0.045, 2.23, "85 GB"),
    "arxiv": (0.025, 1.06, "92 GB"),
    "stackexchange": (0.020, 1.03, "78 GB"),
}
LLAMA1_TOKENS = 1.4e12


@dataclass(frozen=True)
class MixtureEntry:
    name: str
    weight: float
    prefix: str
    tokens: int | None = None
    documents: int | None = None


@dataclass
class MixtureSpec:
    entries: list[MixtureEntry]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("a mixture needs at least one source")
        bad = [e.name for e in self.entries if not e.weight > 0]
        if bad:
            raise ValueError(f"mixture weights must be > 0; fix the weights of {bad}")

    @property
    def total_weight(self) -> float:
        return sum(e.weight for e in self.entries)

    def normalized(self) -> dict[str, float]:
        return {e.name: e.weight / self.total_weight for e in self.entries}

    def megatron_blend(self) -> tuple[list[str], list[float]]:
        return [e.prefix for e in self.entries], [e.weight / self.total_weight for e in self.entries]

    @classmethod
    def from_weights(cls, data_dir: str | Path, weights: dict[str, float] | None = None) -> MixtureSpec:
        """Sources of one prepared directory; ``weights=None`` samples in proportion to tokens."""
        m = read_manifest(data_dir)
        avail = {k: v for k, v in m["sources"].items() if v.get("prefix")}
        names = list(weights) if weights else list(avail)
        missing = [n for n in names if n not in avail]
        if missing:
            raise ValueError(f"{Path(data_dir) / 'manifest.json'}: no prepared source {missing}; "
                             f"it has {sorted(avail)} (sources with 0 kept documents have no data)")
        return cls([MixtureEntry(n, float(weights[n]) if weights else float(avail[n]["tokens"]),
                                 str(Path(data_dir) / avail[n]["prefix"]), avail[n]["tokens"], avail[n]["documents"])
                    for n in names])

    @classmethod
    def from_file(cls, path: str | Path) -> MixtureSpec:
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
            entries = []
            for name, e in spec["sources"].items():
                if "data" in e:
                    one = cls.from_weights(path.parent / e["data"], {e.get("source", name): e["weight"]}).entries[0]
                    entries.append(MixtureEntry(name, one.weight, one.prefix, one.tokens, one.documents))
                else:
                    prefix = str(path.parent / e["prefix"])
                    entries.append(MixtureEntry(name, float(e["weight"]), prefix, *_counts_for_prefix(prefix)))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a mixture spec ({err!r}); expected "
                             '{"sources": {"NAME": {"weight": W, "prefix": P} | {"weight": W, "data": DIR}}}') from err
        return cls(entries)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    p = Path(data_dir) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not found; run `python -m data_pipeline prepare --output {data_dir}` first")
    m = json.loads(p.read_text())
    if not m.get("complete"):
        raise ValueError(f"{p}: the prepare run did not finish; re-run the same prepare command to resume")
    return m


def _counts_for_prefix(prefix: str) -> tuple[int | None, int | None]:
    """Tokens and documents for a prefix written by ``prepare`` (its directory's manifest), else None."""
    p = Path(prefix)
    try:
        m = read_manifest(p.parent)
    except (FileNotFoundError, ValueError):
        return None, None
    for s in m["sources"].values():
        if s.get("prefix") == p.name:
            return s["tokens"], s["documents"]
    return None, None


def llama1_preset(prefixes: dict[str, str | Path], *, strict: bool = False) -> MixtureSpec:
    """The Llama 1 mixture over the sources given (name -> megatron prefix, names as in LLAMA1_MIXTURE)."""
    unknown = sorted(set(prefixes) - set(LLAMA1_MIXTURE))
    if unknown:
        raise ValueError(f"llama1 preset: unknown source names {unknown}; use {sorted(LLAMA1_MIXTURE)}")
    missing = [n for n in LLAMA1_MIXTURE if n not in prefixes]
    if missing and strict:
        raise ValueError(f"llama1 preset (strict): missing sources {missing}")
    entries = [MixtureEntry(n, LLAMA1_MIXTURE[n][0], str(prefixes[n]), *_counts_for_prefix(str(prefixes[n])))
               for n in LLAMA1_MIXTURE if n in prefixes]
    notes = []
    if missing:
        dropped = sum(LLAMA1_MIXTURE[n][0] for n in missing)
        notes.append(f"llama1 preset: {', '.join(missing)} not prepared; their {dropped:.1%} is shared "
                     f"out in proportion among {', '.join(e.name for e in entries)}")
    return MixtureSpec(entries, notes)


def epochs_report(spec: MixtureSpec, token_budget: float) -> list[dict[str, Any]]:
    """Per source: sampling proportion, tokens available, tokens drawn for the budget, epochs (as Llama 1)."""
    rows = []
    for name, w in spec.normalized().items():
        e = next(x for x in spec.entries if x.name == name)
        drawn = w * token_budget
        rows.append({"source": name, "weight": w, "tokens_available": e.tokens, "tokens_drawn": drawn,
                     "epochs": (drawn / e.tokens) if e.tokens else None})
    return rows


def format_epochs_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'source':<16}{'weight':>9}{'tokens':>16}{'drawn':>16}{'epochs':>9}"]
    for r in rows:
        ep = f"{r['epochs']:.2f}" if r["epochs"] is not None else "?"
        tok = f"{r['tokens_available']:,}" if r["tokens_available"] is not None else "?"
        lines.append(f"{r['source']:<16}{r['weight']:>8.1%}{tok:>16}{r['tokens_drawn']:>16,.0f}{ep:>9}")
    return "\n".join(lines)


def parse_weights(text: str) -> dict[str, float]:
    """``cc=0.67,c4=0.15,wiki=0.18`` -> dict."""
    out = {}
    for part in filter(None, text.split(",")):
        name, sep, w = part.partition("=")
        if not sep:
            raise ValueError(f"--weights {text!r}: expected NAME=WEIGHT,NAME=WEIGHT")
        out[name.strip()] = float(w)
    return out
