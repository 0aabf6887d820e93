"""Ghost Attention data (Llama 2 sec. 3.3): build the dialogues, and turn them into token-exact training examples.

    built = build_dialogues(user_turns, instructions, answer_fn=model_answer_fn(model, tok, template="llama2"))
    examples, report = training_examples(built, tokenizer=tok, template="llama2", train_turns="last")
    dataset = ExampleDataset(examples, seq_len=512, num_samples=steps * batch, seed=0)

Build (``build_dialogues``): for each dialogue ``[u1, ..., un]`` and its instruction ``inst``, the answers are
sampled turn by turn with the current model from prompts in which ``inst`` is attached to EVERY user message
(``attach``); the training dialogue then keeps ``inst`` only in the FIRST user message and pairs each
original user message with the answer sampled under the instruction.

Train (``training_examples``): the dialogue's chat encoding (``model/chat.py``) with the loss mask on the
LAST assistant turn only (``train_turns="last"``): every token of the previous turns, assistant answers
included, has loss 0. ``truncate="random"`` cuts each dialogue after a random number of turns first, so every
turn depth is trained while each example still learns only its last turn. ``train_turns="all"`` (loss on every
assistant turn) is plain multi-turn SFT, used for baselines.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.chat import encode_chat
from rlhf.gatt.instructions import Instruction
from train.config_reader import ConfigError

Messages = list[dict[str, str]]


def attach(user: str, instruction: str) -> str:
    """The user message with the instruction in front of it (``"Act as Napoleon. What is ...?"``)."""
    return f"{instruction.strip()} {user.strip()}"


@dataclass
class GAttDialogue:
    messages: Messages
    """The training form: instruction in the first user message only, answers sampled under it."""
    instruction: Instruction

    def to_json(self) -> str:
        return json.dumps({"messages": self.messages, "instruction": self.instruction.to_dict()})

    @classmethod
    def from_json(cls, line: str) -> GAttDialogue:
        d = json.loads(line)
        return cls(messages=d["messages"], instruction=Instruction.from_dict(d["instruction"]))


def with_instruction(user_turns: Sequence[str], answers: Sequence[str], instruction: str, *,
                     every_turn: bool) -> Messages:
    """Alternating messages; the instruction attached to every user message, or to the first only."""
    out: Messages = []
    for k, user in enumerate(user_turns):
        content = attach(user, instruction) if (every_turn or k == 0) else user.strip()
        out.append({"role": "user", "content": content})
        if k < len(answers):
            out.append({"role": "assistant", "content": answers[k]})
    return out


def sample_answers(user_turns: Sequence[Sequence[str]], instructions: Sequence[Instruction], *,
                   answer_fn: Callable[[list[Messages]], list[str]], every_turn: bool) -> list[list[str]]:
    """Every dialogue's answers turn by turn (one ``answer_fn`` batch per turn), each turn seeing the earlier
    answers; the instruction attached to every user message (build) or only to the first (evaluation)."""
    if len(user_turns) != len(instructions):
        raise ValueError(f"{len(user_turns)} dialogues but {len(instructions)} instructions")
    answers: list[list[str]] = [[] for _ in user_turns]
    for t in range(max((len(u) for u in user_turns), default=0)):
        active = [i for i, turns in enumerate(user_turns) if t < len(turns)]
        prompts = [with_instruction(user_turns[i][: t + 1], answers[i], instructions[i].text, every_turn=every_turn)
                   for i in active]
        for i, answer in zip(active, answer_fn(prompts), strict=True):
            answers[i].append(answer)
    return answers


def build_dialogues(user_turns: Sequence[Sequence[str]], instructions: Sequence[Instruction], *,
                    answer_fn: Callable[[list[Messages]], list[str]]) -> list[GAttDialogue]:
    """GAtt's build step: answers sampled with the instruction in EVERY user message; returned in the training
    form, the instruction kept in the FIRST user message only."""
    answers = sample_answers(user_turns, instructions, answer_fn=answer_fn, every_turn=True)
    return [GAttDialogue(messages=with_instruction(turns, answers[i], instructions[i].text, every_turn=False),
                         instruction=instructions[i]) for i, turns in enumerate(user_turns)]


def model_answer_fn(model: Any, tokenizer: Any, *, template: str, max_new_tokens: int, temperature: float = 0.0,
                    seed: int = 0, batch_size: int = 32) -> Callable[[list[Messages]], list[str]]:
    """``answer_fn`` sampling with a plain ``Llama`` and the KV-cache generator (greedy at temperature 0)."""
    from model.generate import generate

    calls = [0]

    def answer(prompts: list[Messages]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            part = prompts[start : start + batch_size]
            ids = [encode_chat(tokenizer, p, template=template, add_generation_prompt=True).ids for p in part]
            gen = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                           seed=None if temperature <= 0 else seed + calls[0] * 100_003 + start)
            out += [tokenizer.decode(g).strip() for g in gen]
        calls[0] += 1
        return out

    return answer


# ------------------------------------------------------------------------------------------ training examples


@dataclass
class Example:
    ids: list[int]
    loss_mask: list[int]
    """1 on the tokens whose prediction is trained (``ids[i]`` is a target), aligned with ``ids``."""


def loss_mask_for(encoding: Any, *, train_turns: str) -> list[int]:
    """``train_turns="last"``: the last assistant turn only (GAtt); ``"all"``: every assistant turn (SFT)."""
    if train_turns == "all":
        return list(encoding.assistant_mask)
    if train_turns != "last":
        raise ValueError(f"train_turns={train_turns!r}: use 'last' (GAtt) or 'all' (SFT)")
    last = max(encoding.turn_index)
    return [int(m == 1 and t == last) for m, t in zip(encoding.assistant_mask, encoding.turn_index)]


def training_examples(dialogues: Sequence[GAttDialogue | Messages], *, tokenizer: Any, template: str,
                      train_turns: str = "last", truncate: str = "none",
                      seed: int = 0) -> tuple[list[Example], Counter[str]]:
    """Chat-encoded examples with their loss masks; ``report`` counts what was done with each dialogue."""
    rng, report = random.Random(seed), Counter[str]()
    out: list[Example] = []
    for d in dialogues:
        messages = d.messages if isinstance(d, GAttDialogue) else d
        n_turns = sum(m["role"] == "assistant" for m in messages)
        if n_turns == 0 or messages[-1]["role"] != "assistant":
            report["skipped: does not end with an assistant turn"] += 1
            continue
        if truncate == "random":
            messages = messages[: 2 * rng.randint(1, n_turns) + (1 if messages[0]["role"] == "system" else 0)]
        elif truncate != "none":
            raise ValueError(f"truncate={truncate!r}: use 'none' or 'random'")
        enc = encode_chat(tokenizer, messages, template=template)
        out.append(Example(ids=list(enc.ids), loss_mask=loss_mask_for(enc, train_turns=train_turns)))
        report["kept"] += 1
    return out, report


class ExampleDataset:
    """Fixed-length training items from examples, indexable like ``GPTDataset`` (read by ``GlobalBatchLoader``).

    Item ``i`` is example ``perm_e[i % n]`` of epoch ``e = i // n`` (a seeded permutation per epoch), so the
    order depends only on the seed. Each item is ``tokens = ids[:-1]``, ``labels = ids[1:]``, ``loss_mask =
    mask[1:]``, right-padded to ``seq_len``; examples longer than ``seq_len + 1`` are dropped and counted.
    """

    def __init__(self, examples: Sequence[Example], *, seq_len: int, num_samples: int, seed: int,
                 pad_id: int = 0) -> None:
        self.examples = [e for e in examples if len(e.ids) <= seq_len + 1]
        self.dropped = len(examples) - len(self.examples)
        if not self.examples:
            raise ConfigError(f"no example fits data.seq_len={seq_len} (longest: "
                              f"{max((len(e.ids) for e in examples), default=0)} tokens)")
        self.seq_len, self.num_samples, self.seed, self.pad_id = seq_len, num_samples, seed, pad_id

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        n = len(self.examples)
        order = list(range(n))
        random.Random(self.seed * 1_000_003 + int(i) // n).shuffle(order)
        e = self.examples[order[int(i) % n]]
        ids = torch.full((self.seq_len + 1,), self.pad_id, dtype=torch.long)
        mask = torch.zeros(self.seq_len + 1)
        ids[: len(e.ids)] = torch.tensor(e.ids)
        mask[: len(e.ids)] = torch.tensor(e.loss_mask, dtype=torch.float32)
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": mask[1:], "length": len(e.ids) - 1}


def read_gatt_jsonl(path: str | Path) -> list[GAttDialogue | Messages]:
    """``build`` output records (with their instruction), or plain ``{"messages": [...]}`` dialogues."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    out: list[GAttDialogue | Messages] = []
    for k, line in enumerate(lines):
        try:
            record = json.loads(line)
            out.append(GAttDialogue.from_json(line) if "instruction" in record else list(record["messages"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path}:{k + 1}: neither a GAtt record nor a {{'messages': [...]}} dialogue "
                              f"({err})") from None
    return out


def write_gatt_jsonl(dialogues: Sequence[GAttDialogue], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(d.to_json() + "\n" for d in dialogues))


def collate_trimmed(items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """The ``collate`` of GAtt's ``data_pipeline.global_batch.GlobalBatchLoader``: ``ExampleDataset`` items cut to
    the micro-batch's longest example (right padding under causal attention: the cut columns change nothing but
    the cost). No document mask: every turn attends to the first user message."""
    width = max(int(it["length"]) for it in items)
    tokens = torch.stack([it["tokens"][:width] for it in items]).long()
    return {"input_ids": tokens, "labels": torch.stack([it["labels"][:width] for it in items]).long(),
            "loss_mask": torch.stack([it["loss_mask"][:width] for it in items]).float(),
            "document_ids": torch.zeros_like(tokens)}
