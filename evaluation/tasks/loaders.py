"""Loaders for the local benchmark files whose layout `dataset_path: json` alone cannot express.

Referenced from the task YAMLs beside this file (``custom_dataset: !function evaluation.tasks.loaders...`` or
``process_docs``); lm-eval calls them with the task's ``dataset_kwargs`` (paths already rendered from
``$LLAMA_DATA_DIR`` by ``evaluation.tasks.render_tasks``) plus its metadata.

- PIQA: the questions and the labels are two aligned files (``valid.jsonl``, ``valid-labels.lst``).
- ARC: AI2's original records nest the question (``{"question": {"stem", "choices"}}``); lm-eval's prompt
  expects the Hugging Face layout (``question`` string, ``choices: {text, label}``).
- WikiText-2: one raw text file of articles; lm-eval's wikitext task scores one article ("page") per document.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets

# An article starts at a level-1 heading line " = Title = " (level 2 is " = = Section = = ").
WIKITEXT_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def _read_labels(path: str | Path, *, expected: int, source: str | Path) -> list[int]:
    lines = Path(path).read_text(encoding="utf-8").split()
    if len(lines) != expected:
        raise ValueError(f"{path}: {len(lines)} labels for {expected} records in {source}; the two files must be "
                         "aligned line by line (re-copy both from the same PIQA release)")
    bad = [(i + 1, v) for i, v in enumerate(lines) if v not in ("0", "1")]
    if bad:
        raise ValueError(f"{path}: line {bad[0][0]} holds {bad[0][1]!r}; PIQA labels are 0 or 1")
    return [int(v) for v in lines]


def load_piqa(*, data_files: dict[str, str], labels_files: dict[str, str], **_: Any) -> datasets.DatasetDict:
    """PIQA splits with their ``label`` column joined from the labels files (one 0/1 per line)."""
    splits = {}
    for split, path in data_files.items():
        docs = datasets.load_dataset("json", data_files={split: path})[split]
        labels = _read_labels(labels_files[split], expected=len(docs), source=path)
        splits[split] = docs.add_column("label", labels)
    return datasets.DatasetDict(splits)


def arc_original_to_hf(dataset: datasets.Dataset) -> datasets.Dataset:
    """AI2's ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`` -> the HF columns."""

    def flatten(doc: dict[str, Any]) -> dict[str, Any]:
        choices = doc["question"]["choices"]
        return {"id": doc["id"], "question": doc["question"]["stem"], "answerKey": doc["answerKey"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}

    return dataset.map(flatten, remove_columns=dataset.column_names)


def split_wikitext_articles(text: str) -> list[str]:
    """Articles of a raw WikiText file, each starting at its level-1 heading; line ends normalised to ``\\n``."""
    pages: list[list[str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if WIKITEXT_ARTICLE_HEADING.match(line) or not pages:
            pages.append([])
        pages[-1].append(line)
    return ["\n".join(lines).strip("\n") + "\n" for lines in pages if any(s.strip() for s in lines)]


def load_wikitext_pages(*, data_files: dict[str, str], **_: Any) -> datasets.DatasetDict:
    """One ``{"page": article}`` record per article of each raw WikiText file."""
    splits = {}
    for split, path in data_files.items():
        pages = split_wikitext_articles(Path(path).read_text(encoding="utf-8"))
        splits[split] = datasets.Dataset.from_dict({"page": pages})
    return datasets.DatasetDict(splits)
