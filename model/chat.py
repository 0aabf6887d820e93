"""Llama 2, Llama 3 and Llama 3.1 chat formats: dialogs -> token ids + a loss mask over the assistant's tokens.

    from model.chat import encode_chat, parse_messages
    msgs = parse_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    enc = encode_chat(tokenizer, msgs, template="llama3")            # a training example
    enc.ids, enc.assistant_mask, enc.turn_index
    prompt = encode_chat(tokenizer, msgs[:1], template="llama3", add_generation_prompt=True).ids

Token-exact with Meta's references: Llama 2 ``Llama.chat_completion`` (llama/generation.py: each
(user, assistant) pair encoded separately as ``[BOS] + encode("[INST] {u} [/INST] {a} ") + [EOS]``, the system
prompt merged into the first user message) and Llama 3 ``ChatFormat`` (llama3/tokenizer.py: header =
special id, encode(role), special id, encode("\\n\\n"); content stripped; ``<|eot_id|>``).
Temporal perception (Llama 2 sec. 5.1, Llama 3.1 system prompts): ``date=`` prepends
"Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n" to the system prompt (llama2/llama3;
the date as Hugging Face's Llama 3.1 chat template writes it).

``template="llama3_1"`` is Meta's llama-models (``models/llama3/chat_format.py`` ``ChatFormat`` with the
``SystemDefaultGenerator`` preamble that llama-stack's ``augment_messages_for_tools_llama_3_1`` puts in every
Llama 3.1 dialog): message contents are encoded as given (no strip, unlike the llama3 repository), and the
system message is always ``"Cutting Knowledge Date: December 2023\\nToday Date: {%d %B %Y}\\n"`` (full month
name: "26 July 2024"), followed by ``"\\n" + system`` when the dialog has one (``llama3_1_system_prompt``).
The date defaults to 26 July 2024 (the release) so that training data does not depend on the day it is built.
Tests: ``pytest tests/unit/test_chat.py``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
TEMPLATES = ("llama2", "llama3", "llama3_1")
KNOWLEDGE_CUTOFF = "December 2023"
LLAMA3_1_DEFAULT_DATE = datetime.date(2024, 7, 26)
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Meta llama/generation.py
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


@dataclass(frozen=True)
class Message:
    role: str
    """"system" | "user" | "assistant"."""
    content: str


@dataclass
class ChatEncoding:
    ids: list[int]
    assistant_mask: list[int]
    """1 on tokens the model learns: assistant content and its end token (L2 ``</s>``, L3 ``<|eot_id|>``)."""
    turn_index: list[int]
    """0-based index of the assistant turn each token belongs to, -1 elsewhere (GAtt trains the last only)."""

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.assistant_mask) == len(self.turn_index):
            raise ValueError("ChatEncoding: ids, assistant_mask and turn_index must have the same length")

    def __len__(self) -> int:
        return len(self.ids)


def parse_messages(obj: Any) -> list[Message]:
    """Validate a list of ``{"role", "content"}`` dicts (or Messages); errors name the index and field."""
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence):
        raise ValueError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(obj).__name__}")
    out: list[Message] = []
    for i, m in enumerate(obj):
        if isinstance(m, Message):
            role, content = m.role, m.content
        elif isinstance(m, dict):
            missing = [k for k in ("role", "content") if k not in m]
            if missing:
                raise ValueError(f"messages[{i}]: missing field(s) {missing}; each message needs 'role' and 'content'")
            role, content = m["role"], m["content"]
        else:
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected str, got {type(content).__name__}")
        out.append(Message(role=role, content=content))
    return out


def _format_date(date: datetime.date | str, *, full_month: bool = False) -> str:
    """"26 Jul 2024" (``%d %b %Y`` in the C locale, without depending on the process locale); ``full_month``:
    "26 July 2024" (``%d %B %Y``, llama-models)."""
    if isinstance(date, str):
        m = re.fullmatch(r"(\d{1,2}) ([A-Z][a-z]+) (\d{4})", date.strip())
        month = m and (_MONTHS.index(m.group(2)) + 1 if m.group(2) in _MONTHS else
                       _MONTH_NAMES.index(m.group(2)) + 1 if m.group(2) in _MONTH_NAMES else None)
        if m and month:
            date = datetime.date(int(m.group(3)), month, int(m.group(1)))
        else:
            try:
                date = datetime.date.fromisoformat(date.strip())
            except ValueError:
                raise ValueError(f"date: {date!r} is neither ISO (2024-07-26) nor '26 Jul 2024' / '26 July 2024'") from None
    if not isinstance(date, datetime.date):
        raise ValueError(f"date: expected datetime.date or str, got {type(date).__name__}")
    month = (_MONTH_NAMES if full_month else _MONTHS)[date.month - 1]
    return f"{date.day:02d} {month} {date.year}"


def llama3_1_system_prompt(system: str | None = None, *, date: datetime.date | str = LLAMA3_1_DEFAULT_DATE) -> str:
    """The system message llama-stack gives every Llama 3.1 dialog (no tools): the default preamble, then
    ``"\\n" + system`` when there is one. ``"Cutting Knowledge Date: December 2023\\nToday Date: 26 July 2024\\n"``."""
    preamble = f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {_format_date(date, full_month=True)}\n"
    return preamble + ("\n" + system if system else "")


def _with_date(messages: list[Message], date: datetime.date | str | None) -> list[Message]:
    """Prepend the Llama 3.1 date preamble to the system message, creating one if there is none."""
    if date is None:
        return messages
    preamble = f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {_format_date(date)}\n\n"
    if messages and messages[0].role == "system":
        return [Message("system", preamble + messages[0].content)] + messages[1:]
    # No system prompt: just the two lines (llama3 strips content anyway; llama2 would keep a blank line).
    return [Message("system", preamble.rstrip("\n"))] + messages


def _check_system_first(messages: list[Message]) -> None:
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise ValueError(f"messages[{i}].role: 'system' is only allowed as the first message")


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _validate_llama2(messages: list[Message]) -> None:
    """Meta's chat_completion assertions (and its refusal of control tags), with the offending index."""
    for i, m in enumerate(messages):
        tag = next((t for t in LLAMA2_SPECIAL_TAGS if t in m.content), None)
        if tag is not None:  # Meta answers "special tags are not allowed as part of the prompt"
            raise ValueError(f"messages[{i}].content: contains the Llama 2 control tag {tag!r}")
    start = 1 if messages[0].role == "system" else 0
    if start == len(messages):
        raise ValueError("messages: a llama2 dialog needs a user message after the system message")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i].role != expected:
            raise ValueError(
                f"messages[{i}].role: expected {expected!r}, got {messages[i].role!r}: llama2 dialogs are an "
                "optional 'system', then 'user' and 'assistant' alternating"
            )


def _encode_llama2(tok: Tokenizer, messages: list[Message], *, add_generation_prompt: bool) -> ChatEncoding:
    """Meta's Llama 2 chat_completion on a validated dialog."""
    dialog = list(messages)
    if dialog[0].role == "system":
        dialog = [Message("user", B_SYS + dialog[0].content + E_SYS + dialog[1].content)] + dialog[2:]
    ends_with_user = dialog[-1].role == "user"
    if not ends_with_user and add_generation_prompt:
        raise ValueError("add_generation_prompt: a llama2 prompt must end with a user message, got 'assistant'")
    ids: list[int] = []
    mask: list[int] = []
    turn: list[int] = []
    for t, (user, answer) in enumerate(zip(dialog[::2], dialog[1::2])):
        prompt = tok.encode(f"{B_INST} {user.content.strip()} {E_INST}")
        full = tok.encode(f"{B_INST} {user.content.strip()} {E_INST} {answer.content.strip()} ")
        # The answer's tokens are what follows the prompt's own encoding (sentencepiece never merges across
        # the space after "[/INST]"; if a tokenizer did, the merged token would count as the answer's).
        k = _common_prefix_len(prompt, full)
        ids += [tok.bos_id] + full + [tok.eos_id]
        n_answer = len(full) - k + 1  # answer tokens (incl. its trailing space) + </s>
        mask += [0] * (1 + k) + [1] * n_answer
        turn += [-1] * (1 + k) + [t] * n_answer
    if ends_with_user:
        last = [tok.bos_id] + tok.encode(f"{B_INST} {dialog[-1].content.strip()} {E_INST}")
        ids += last
        mask += [0] * len(last)
        turn += [-1] * len(last)
    return ChatEncoding(ids=ids, assistant_mask=mask, turn_index=turn)


def _special(tok: Tokenizer, name: str) -> int:
    try:
        return tok.piece_to_id(name)
    except (KeyError, ValueError):
        raise ValueError(f"template 'llama3' needs a Llama 3 tokenizer with {name}; got {tok!r}") from None


def _encode_llama3(tok: Tokenizer, messages: list[Message], *, add_generation_prompt: bool,
                   strip: bool = True) -> ChatEncoding:
    """Meta's Llama 3 ChatFormat.encode_dialog_prompt (the final assistant header only if asked); ``strip``: the
    llama3 repository strips every content, llama-models (Llama 3.1) encodes it as given."""
    start, end, eot = (_special(tok, n) for n in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    newlines = tok.encode("\n\n")

    def header(role: str) -> list[int]:
        return [start] + tok.encode(role) + [end] + newlines

    ids = [tok.bos_id]
    mask = [0]
    turn = [-1]
    n_assistant = 0
    for m in messages:
        h = header(m.role)
        body = tok.encode(m.content.strip() if strip else m.content) + [eot]
        ids += h + body
        mask += [0] * len(h)
        turn += [-1] * len(h)
        if m.role == "assistant":
            mask += [1] * len(body)
            turn += [n_assistant] * len(body)
            n_assistant += 1
        else:
            mask += [0] * len(body)
            turn += [-1] * len(body)
    if add_generation_prompt:
        h = header("assistant")
        ids += h
        mask += [0] * len(h)
        turn += [-1] * len(h)
    return ChatEncoding(ids=ids, assistant_mask=mask, turn_index=turn)


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message | dict],
    *,
    template: str,
    add_generation_prompt: bool = False,
    date: datetime.date | str | None = None,
) -> ChatEncoding:
    """Encode a dialog with the ``"llama2"``, ``"llama3"`` or ``"llama3_1"`` chat format (module docstring).

    A dialog ending with an assistant message (and ``add_generation_prompt=False``) is a training example;
    ``add_generation_prompt=True`` makes a prompt to generate from (llama3: an open assistant header; llama2:
    the dialog must end with a user turn, which Meta's format always leaves open). llama2 needs strictly
    alternating user/assistant after an optional system message and rejects contents holding its control
    tags, as Meta's reference does; llama3 (like Meta's ChatFormat) allows any user/assistant order.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template: {template!r} is not one of {TEMPLATES}")
    msgs = parse_messages(messages)
    if not msgs:
        raise ValueError("messages: the dialog is empty")
    _check_system_first(msgs)
    if template == "llama3_1":
        system = msgs[0].content if msgs[0].role == "system" else None
        rest = msgs[1:] if system is not None else msgs
        full = [Message("system", llama3_1_system_prompt(system, date=LLAMA3_1_DEFAULT_DATE if date is None
                                                         else date))] + rest
        return _encode_llama3(tokenizer, full, add_generation_prompt=add_generation_prompt, strip=False)
    dated = _with_date(msgs, date)
    if template == "llama2":
        _validate_llama2(msgs)
        return _encode_llama2(tokenizer, dated, add_generation_prompt=add_generation_prompt)
    return _encode_llama3(tokenizer, dated, add_generation_prompt=add_generation_prompt)
