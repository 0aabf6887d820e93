"""Held-out perplexity: bits per byte, per-token and per-word perplexity over documents, with rolling windows.

    python -m evaluation perplexity --checkpoint DIR --tokenizer TOK --data wikitext-2-raw.test.txt \
        --split wikitext-articles --output ppl.json     # lm-eval's wikitext: detokenized articles
    python -m evaluation perplexity --checkpoint DIR --data runs/data/wikipedia     # .bin/.idx shards (a prefix),
    python -m evaluation perplexity --checkpoint DIR --data runs/data               # or a `prepare` output dir
    torchrun --nproc-per-node 2 -m evaluation perplexity --tp 2 ...                 # TP / DP as for `run`

Semantics are lm-eval's ``loglikelihood_rolling``: each document is scored on its own; every token is predicted
exactly once, the first from BOS alone, in windows of ``max_length`` tokens (``--context-len K`` gives every
window K - 1 tokens of overlap as context: a sliding window with stride ``max_length - K + 1``). Departure from
lm-eval's ``hf`` backend, on purpose: the document is encoded *without* a BOS of its own (the ``hf`` backend adds
one and then also predicts it from the BOS prefix).

The figures are lm-eval's formulas (``lm_eval.api.metrics``): token / word / byte perplexity =
``exp(-sum(loglik) / sum(tokens | words | bytes))``, bits per byte = ``-sum(loglik) / (sum(bytes) ln 2)``, with
words = ``len(re.split(r"\\s+", text))`` (lm-eval's wikitext count) and bytes the UTF-8 length. Shard documents
are decoded to text for the byte and word counts; their trailing EOS is not scored (text has none).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("none", "lines", "wikitext-articles")


@dataclass
class Document:
    """One scored unit: its text (bytes and words are counted on it), what is scored (``score_text``, default
    ``text``) and, for shards, the token ids (else ``score_text`` is encoded)."""

    text: str
    tokens: list[int] | None = None
    score_text: str | None = None


def _shard_prefixes(path: Path) -> list[Path]:
    """``PREFIX`` / ``PREFIX.idx`` / ``PREFIX.bin`` / a ``prepare`` output directory -> shard prefixes."""
    if path.is_dir() and (path / "manifest.json").exists():
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return [path / s["prefix"] for s in manifest["sources"].values() if s.get("prefix")]
    if path.suffix in (".idx", ".bin"):
        path = path.with_suffix("")
    return [path] if Path(f"{path}.idx").exists() else []


def read_documents(path: Path, *, split: str, text_field: str, tokenizer: Any) -> Iterator[Document]:
    """Documents of a text file (whole, per line, or per WikiText article), a JSONL file, or token shards."""
    prefixes = _shard_prefixes(path)
    if prefixes:
        yield from _shard_documents(prefixes, tokenizer=tokenizer)
        return
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: not a file, a .bin/.idx prefix, or a `python -m data_pipeline "
                                "prepare` output directory")
    opener = gzip.open if path.suffix == ".gz" else open
    if ".jsonl" in path.suffixes or ".json" in path.suffixes:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{lineno}: no string field {text_field!r} (use --text-field NAME)")
                yield Document(record[text_field])
        return
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    if split == "none":
        yield Document(text)
    elif split == "lines":
        yield from (Document(line) for line in text.splitlines() if line.strip())
    else:
        from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

        from evaluation.tasks.loaders import split_wikitext_articles

        # As lm-eval's wikitext task: the detokenized article is scored, words and bytes are counted on the
        # original (so figures are comparable with published lm-eval WikiText numbers).
        yield from (Document(page, score_text=wikitext_detokenizer({"page": page}))
                    for page in split_wikitext_articles(text))


def _shard_documents(prefixes: list[Path], *, tokenizer: Any) -> Iterator[Document]:
    import numpy as np

    from data_pipeline.shard_io import read_index, validate_indexed

    for prefix in prefixes:
        validate_indexed(prefix)
        index = read_index(prefix)
        tokens = np.memmap(f"{prefix}.bin", mode="r", dtype=index["dtype"])
        starts = np.concatenate([[0], np.cumsum(index["lengths"], dtype=np.int64)])
        docs = index["doc_indices"]
        for d in range(len(docs) - 1):
            ids = [int(t) for t in tokens[starts[docs[d]] : starts[docs[d + 1]]]]
            if ids and ids[-1] == tokenizer.eos_id:
                ids = ids[:-1]
            if ids and ids[0] == tokenizer.bos_id:
                ids = ids[1:]
            yield Document(tokenizer.decode(ids), ids)


def summarize(loglikelihoods: list[float], documents: list[Document], token_counts: list[int]) -> dict[str, Any]:
    """lm-eval's weighted perplexities and bits per byte over all documents."""
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    words = [len(re.split(r"\s+", d.text)) for d in documents]
    nbytes = [len(d.text.encode("utf-8")) for d in documents]
    total = float(sum(loglikelihoods))
    return {
        "documents": len(documents), "tokens": sum(token_counts), "words": sum(words), "bytes": sum(nbytes),
        "loglikelihood": total,
        "token_perplexity": math.exp(-total / max(sum(token_counts), 1)),
        "word_perplexity": weighted_perplexity(list(zip(loglikelihoods, words))),
        "byte_perplexity": weighted_perplexity(list(zip(loglikelihoods, nbytes))),
        "bits_per_byte": bits_per_byte(list(zip(loglikelihoods, nbytes))),
    }


def document_perplexity(runner: Any, tokenizer: Any, documents: list[Document], *, batch_size: int,
                        context_len: int = 1) -> dict[str, Any]:
    """Score ``documents`` with our model (``runner``: ``evaluation.scoring.LlamaRunner``) -> ``summarize``."""
    from evaluation.scoring import rolling_loglikelihoods

    token_lists = [d.tokens if d.tokens is not None else tokenizer.encode(d.score_text if d.score_text is not None
                                                                          else d.text) for d in documents]
    kept = [i for i, t in enumerate(token_lists) if t]
    lls = rolling_loglikelihoods(runner, [token_lists[i] for i in kept], prefix=tokenizer.bos_id,
                                 batch_size=batch_size, context_len=context_len)
    result = summarize(lls, [documents[i] for i in kept], [len(token_lists[i]) for i in kept])
    result["empty_documents_skipped"] = len(documents) - len(kept)
    return result


def _perplexity(args: argparse.Namespace) -> int:
    from evaluation.adapter import LlamaLM
    from evaluation.parallel import init_groups
    from evaluation.results import write_json

    if not 1 <= args.context_len:
        raise ValueError(f"--context-len {args.context_len}: give 1 (lm-eval's windows) or more")
    groups = init_groups(tp=args.tp)
    lm = LlamaLM.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, groups=groups,
                                 batch_size=args.batch_size, max_length=args.max_length)
    if args.context_len > lm.max_length:
        raise ValueError(f"--context-len {args.context_len} exceeds the window of {lm.max_length} tokens")
    documents = list(read_documents(args.data, split=args.split, text_field=args.text_field,
                                    tokenizer=lm.llama_tokenizer))
    if args.limit:
        documents = documents[: args.limit]
    if not documents:
        raise ValueError(f"--data {args.data}: no documents")
    start = time.perf_counter()
    result = document_perplexity(lm.runner, lm.llama_tokenizer, documents, batch_size=args.batch_size,
                                 context_len=args.context_len)
    result.update({"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
                   "max_length": lm.max_length, "context_len": args.context_len, "tp": groups.tp_size,
                   "dp": groups.dp_size, "wall_s": round(time.perf_counter() - start, 3)})
    if groups.is_output_rank:
        print(json.dumps({k: result[k] for k in ("documents", "tokens", "token_perplexity", "word_perplexity",
                                                 "byte_perplexity", "bits_per_byte")}, indent=2))
        if args.output:
            write_json(args.output, result)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("perplexity", help="bits per byte, token and word perplexity of documents")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--tokenizer", type=Path, help="tokenizer file (default: DIR/tokenizer.model)")
    p.add_argument("--data", required=True, type=Path,
                   help="text/.jsonl[.gz] file, a .bin/.idx shard prefix, or a `data_pipeline prepare` directory")
    p.add_argument("--split", choices=SPLITS, default="none",
                   help="text files: one document (none), one per non-empty line, or one per WikiText article "
                        "(scored detokenized, counted raw: lm-eval's wikitext task)")
    p.add_argument("--text-field", default="text", help="JSONL: the field holding the document")
    p.add_argument("--context-len", type=int, default=1,
                   help="tokens of context per window (1 = lm-eval's disjoint windows; larger = sliding window)")
    p.add_argument("--max-length", type=int, help="window in tokens (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="first N documents only")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--output", type=Path, help="write the figures as JSON")
    p.set_defaults(func=_perplexity)
