"""Chat text -> training tensors for SFT and reward models (the collate functions of the global-batch loader).

    rows, stats = pack_sft_rows(examples, seq_len=512, pad_id=0)       # several dialogues per sequence
    item = encode_pair(tok, pair, template="llama2", max_len=512, margin_table="large")
    batch = collate_pairs([item, ...])      # {"input_ids" [2B, L], "score_index" [2B], "margin", "pair_weight"}
    loader = GlobalBatchLoader(dataset, collate=stack_rows, global_batch_size=64, micro_batch_size=4,
                               dp_rank=r, dp_size=dp, consumed_samples=0)   # data_pipeline.global_batch

SFT (Llama 2 sec. 3.1, packing as in Llama 3): each dialogue is encoded with its chat format
(``model.chat.encode_chat``: the loss mask covers the assistant's answers and their end token, never the
prompt); the shifted (input, label, mask) triples of several dialogues are packed first-fit into rows of
``seq_len`` with ``document_ids`` so that no token attends across dialogues. A dialogue longer than a row is
cut at the end (counted as ``truncated``); one whose answers all fall past the cut is skipped (counted).

Reward model: one sequence per answer (prompt + answer in the chat format), the score is read at the answer's
last token (the end-of-turn token ``</s>`` / ``<|eot_id|>``, which has seen the whole answer). A sequence
longer than ``max_len`` keeps its first token and its last ``max_len - 1`` tokens (the oldest prompt turns go;
counted). Rows of a micro-batch are right-padded to a common length: with causal attention, padding after the
score position cannot change the score.

Batch order: ``data_pipeline.global_batch.GlobalBatchLoader``, the loader of every stage (pretraining too), with
``stack_rows`` (SFT) or ``collate_pairs`` (reward model) as its ``collate``: the sequence of global batches does
not depend on the DP size and ``consumed_samples`` resumes exactly at any layout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from model.chat import encode_chat
from rlhf.data import Dialogue, PreferencePair
from rlhf.losses import margin_for

PACK_WINDOW = 64
"""First-fit packing looks at the last this-many open rows (bounded time; deterministic)."""


# --------------------------------------------------------------------------------------------------------- SFT
def dialogue_messages(d: Dialogue) -> list[dict[str, str]]:
    return ([{"role": "system", "content": d.system}] if d.system else []) + list(d.messages)


def sft_example(tokenizer: Any, dialogue: Dialogue, *, template: str, seq_len: int,
                stats: Counter[str]) -> tuple[list[int], list[int], list[float]] | None:
    """Shifted ``(inputs, labels, loss_mask)`` of one dialogue (at most ``seq_len`` positions), or None."""
    enc = encode_chat(tokenizer, dialogue_messages(dialogue), template=template, date=dialogue.date)
    ids, mask = enc.ids, enc.assistant_mask
    if len(ids) - 1 > seq_len:
        stats["truncated"] += 1
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    labels_mask = [float(m) for m in mask[1:]]
    if not any(labels_mask):
        stats["skipped_no_answer_tokens_within_seq_len"] += 1
        return None
    stats["dialogues"] += 1
    return ids[:-1], ids[1:], labels_mask


def pack_sft_rows(examples: Sequence[tuple[list[int], list[int], list[float]]], *, seq_len: int,
                  pad_id: int) -> tuple[list[dict[str, Tensor]], Counter[str]]:
    """First-fit pack examples into rows of ``seq_len`` (see the module docstring)."""
    rows: list[list[tuple[list[int], list[int], list[float]]]] = []
    free: list[int] = []
    for ex in examples:
        n = len(ex[0])
        start = max(0, len(rows) - PACK_WINDOW)
        for r in range(start, len(rows)):
            if free[r] >= n:
                rows[r].append(ex)
                free[r] -= n
                break
        else:
            rows.append([ex])
            free.append(seq_len - n)
    out = []
    stats: Counter[str] = Counter()
    for row in rows:
        inputs, labels, mask, docs = [], [], [], []
        for k, (i, lab, m) in enumerate(row):
            inputs += i
            labels += lab
            mask += m
            docs += [k] * len(i)
        pad = seq_len - len(inputs)
        stats["tokens"] += len(inputs)
        stats["padding"] += pad
        stats["loss_tokens"] += int(sum(mask))
        out.append({"input_ids": torch.tensor(inputs + [pad_id] * pad, dtype=torch.long),
                    "labels": torch.tensor(labels + [pad_id] * pad, dtype=torch.long),
                    "loss_mask": torch.tensor(mask + [0.0] * pad, dtype=torch.float32),
                    "document_ids": torch.tensor(docs + [len(row)] * pad, dtype=torch.long)})
    stats["rows"] = len(out)
    return out, stats


def stack_rows(rows: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------------------ reward model
def encode_answer(tokenizer: Any, prompt: Sequence[dict[str, str]], answer: str, *, template: str, max_len: int,
                  system: str | None = None, stats: Counter[str] | None = None) -> tuple[list[int], int]:
    """``(ids, score_index)`` of prompt + answer; the score index is the answer's last token."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        *prompt, {"role": "assistant", "content": answer}]
    enc = encode_chat(tokenizer, messages, template=template)
    ids = enc.ids
    if len(ids) > max_len:
        if stats is not None:
            stats["truncated_left"] += 1
        ids = ids[:1] + ids[len(ids) - (max_len - 1):]
    return ids, len(ids) - 1


def encode_pair(tokenizer: Any, pair: PreferencePair, *, template: str, max_len: int, margin_table: str,
                stats: Counter[str] | None = None) -> dict[str, Any]:
    chosen, ci = encode_answer(tokenizer, pair.prompt, pair.chosen, template=template, max_len=max_len, stats=stats)
    rejected, ri = encode_answer(tokenizer, pair.prompt, pair.rejected, template=template, max_len=max_len,
                                 stats=stats)
    return {"chosen": chosen, "rejected": rejected, "chosen_index": ci, "rejected_index": ri,
            "margin": float(margin_for([pair.rating], margin_table)[0]), "rating": pair.rating}


def pad_sequences(seqs: Sequence[Sequence[int]], *, pad_id: int = 0, multiple: int = 8) -> Tensor:
    """Right-pad to the longest (rounded up to ``multiple``)."""
    length = max(len(s) for s in seqs)
    length = -(-length // multiple) * multiple
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """``B`` pairs -> rows ``0..B-1`` chosen, ``B..2B-1`` rejected (see the module docstring)."""
    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    return {"input_ids": pad_sequences(seqs),
            "score_index": torch.tensor([it["chosen_index"] for it in items]
                                        + [it["rejected_index"] for it in items], dtype=torch.long),
            "margin": torch.tensor([it["margin"] for it in items], dtype=torch.float32),
            "pair_weight": torch.ones(len(items), dtype=torch.float32)}
