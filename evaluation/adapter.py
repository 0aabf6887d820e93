"""lm-evaluation-harness model adapter over our own Llama: ``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``.

    from evaluation.adapter import LlamaLM
    lm = LlamaLM.from_checkpoint("runs/x/final_model", tokenizer="tok.model", batch_size=32)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], task_manager=evaluation.tasks.task_manager())

    lm_eval --model llama-stack --model_args checkpoint=DIR,tokenizer=FILE --tasks ...   # after `import evaluation`

``LlamaLM`` is a ``TemplateLM``: lm-eval's own code turns (context, continuation) strings into token ids
(``_encode_pair``: trailing context spaces move to the continuation; the pair is tokenized whole and split),
and builds the rolling windows (``get_rolling_token_windows`` + ``make_disjoint_window``). Our tokenizer stands
in for the Hugging Face one with the same defaults as lm-eval's ``hf`` backend: ``tok_encode`` adds BOS unless
told not to (``add_bos_token``), the empty-context prefix is BOS, the end-of-text id is EOS. So on the same
weights and tokenizer both backends see the same token ids; ``tests/parity/test_eval_parity.py`` checks it.

Chat models: with ``chat_format`` (``llama2``, ``llama3``, ``llama3_1``) lm-eval's ``apply_chat_template`` option
renders each prompt as a dialog with ``model.chat`` (Meta's formats, token-exact), and ``tok_encode`` maps the
rendered text back to exactly those ids (special tokens included); generation tasks (TruthfulQA-, ToxiGen-style
prompts) then generate as the chat model was trained to answer (``tests/unit/test_eval_chat_template.py``).

The model work happens in ``evaluation.scoring`` (batched, shared contexts read once, head only at scored
positions) and, for generation, in ``model.generate`` (KV cache, greedy or sampled; lm-eval's stop strings end
a row as soon as they appear). Under ``torchrun`` every rank runs the whole evaluation: lm-eval sees one process
(``rank`` 0, ``world_size`` 1) on each, and the adapter splits the model work over the data-parallel ranks and
gathers the results (``evaluation.parallel``), so every rank returns the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch import Tensor

from evaluation.parallel import EvalGroups
from evaluation.scoring import LlamaRunner, rolling_loglikelihoods, score_requests
from model.generate import generate

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend's default


class StopStrings:
    """``generate(stop_fn=...)``: a row ends once its generated text contains one of lm-eval's stop strings.

    Like lm-eval's ``MultiTokenEOSCriteria``, only the last ``len(encode(stop)) + 2`` tokens are decoded per check.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], batch: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.lookback = max((len(tokenizer.encode(s)) + 2 for s in self.stops), default=0)
        self.history: list[list[int]] = [[] for _ in range(batch)]

    def __call__(self, step_tokens: Tensor) -> Tensor:
        ended = torch.zeros(len(self.history), dtype=torch.bool)
        for row, token in enumerate(step_tokens.tolist()):
            self.history[row].append(token)
            if self.stops:
                tail = self.tokenizer.decode(self.history[row][-self.lookback:])
                ended[row] = any(stop in tail for stop in self.stops)
        return ended


@register_model("llama-stack")
class LlamaLM(TemplateLM):
    """See the module docstring. ``runner`` holds the model; ``tokenizer`` is ours (``model.tokenizer``)."""

    def __init__(self, runner: LlamaRunner, tokenizer: Any, *, batch_size: int = 16, add_bos_token: bool = True,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, chat_format: str | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: give a positive number of sequences per forward")
        if tokenizer.vocab_size > runner.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{runner.config.vocab_size}: pass the tokenizer the model was trained with")
        self.runner, self.llama_tokenizer = runner, tokenizer
        self.batch_size_per_forward = int(batch_size)
        self.add_bos_token = add_bos_token
        self._max_gen_toks = int(max_gen_toks)
        if chat_format is not None:
            from model.chat import TEMPLATES

            if chat_format not in TEMPLATES:
                raise ValueError(f"chat_format={chat_format!r}: use one of {', '.join(TEMPLATES)}")
        self.chat_format = chat_format
        # apply_chat_template's rendered text (trailing whitespace cut, as lm-eval's _encode_pair cuts it) ->
        # (the dialog's exact token ids from model.chat, the whitespace cut): tok_encode maps it back to them.
        self._chats: dict[str, tuple[list[int], str]] = {}

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, tokenizer: str | Path | None = None,
                        groups: EvalGroups | None = None, batch_size: int = 16, max_length: int | None = None,
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> LlamaLM:
        """Load a native/HF checkpoint with our code (TP-sharded when ``groups.tp_size > 1``) and its tokenizer."""
        from evaluation.loading import find_tokenizer, load_model
        from model.tokenizer import load_tokenizer

        groups = groups or EvalGroups()
        tok = load_tokenizer(find_tokenizer(checkpoint, tokenizer))
        model = load_model(checkpoint, groups=groups, dtype=dtype)
        return cls(LlamaRunner(model, groups=groups, max_length=max_length), tok, batch_size=batch_size, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LlamaLM:
        """``lm_eval --model llama-stack --model_args checkpoint=DIR,tokenizer=FILE[,batch_size=N]`` (one process)."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"}
        if "checkpoint" not in args:
            raise ValueError("llama-stack model: give --model_args checkpoint=DIR[,tokenizer=FILE]")
        batch = int(extra.get("batch_size", args.pop("batch_size", 16)) or 16)
        return cls.from_checkpoint(args.pop("checkpoint"), tokenizer=args.pop("tokenizer", None), batch_size=batch,
                                   **args)

    # ---- what TemplateLM needs ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.llama_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.llama_tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_forward

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.llama_tokenizer, "path", "llama-tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids; BOS first unless ``add_special_tokens=False`` (or ``add_bos_token=False``), like ``hf``.

        A string that starts with a dialog rendered by ``apply_chat_template`` is that dialog's own ids (special
        tokens included) followed by the rest of the string encoded without BOS."""
        chat = self._chat_prefix(string)
        if chat is not None:
            key, (ids, cut) = chat
            rest = string[len(key):]
            rest = rest[len(cut):] if rest.startswith(cut) else rest
            ids = ids + (self.llama_tokenizer.encode(rest, bos=False) if rest else [])
        else:
            bos = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
            ids = self.llama_tokenizer.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _chat_prefix(self, string: str) -> tuple[str, tuple[list[int], str]] | None:
        if not self._chats:
            return None
        found = [key for key in self._chats if string.startswith(key)]
        return (max(found, key=len), self._chats[max(found, key=len)]) if found else None

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The chat format's name (lm-eval logs it); ``apply_chat_template`` does the work."""
        return self.chat_format

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the dialog in ``chat_format`` (``model.chat``, token-exact with Meta's
        formats), ending where the assistant answers; without ``add_generation_prompt`` a last assistant message is
        a prefill the answer continues. Returns a text that ``tok_encode`` turns back into exactly those ids."""
        from model.chat import encode_chat, parse_messages

        if self.chat_format is None:
            raise ValueError("apply_chat_template: this LlamaLM has no chat_format; pass chat_format= "
                             "(`python -m evaluation run --apply-chat-template llama3`)")
        history, prefill = list(chat_history), ""
        if not add_generation_prompt and history and history[-1]["role"] == "assistant":
            prefill = history.pop()["content"]
        ids = encode_chat(self.llama_tokenizer, parse_messages(history), template=self.chat_format,
                          add_generation_prompt=True).ids
        if prefill:
            ids = ids + self.llama_tokenizer.encode(prefill, bos=False)
        rendered = self._render(ids)
        key = rendered.rstrip()
        while key in self._chats and self._chats[key][0] != ids:  # two dialogs that read alike: keep both exact
            key += "\u200b"
        self._chats[key] = (ids, rendered[len(rendered.rstrip()):])
        return key

    def _render(self, ids: list[int]) -> str:
        """Readable text of chat ids (lm-eval logs it): special tokens by name, the runs between them decoded."""
        tok = self.llama_tokenizer
        special = {tok.bos_id, tok.eos_id, *tok.stop_ids, *getattr(tok, "special_tokens", {}).values()}
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is None or i in special:
                if run:
                    parts.append(tok.decode(run))
                    run = []
                if i is not None:
                    parts.append(tok.id_to_piece(i))
            else:
                run.append(i)
        return "".join(parts)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.llama_tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        answers = score_requests(self.runner, [(ctx, cont) for _, ctx, cont in requests],
                                 batch_size=self.batch_size_per_forward)
        for (request_str, _, _), answer in zip(requests, answers, strict=True):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood over lm-eval's rolling windows of ``max_length`` tokens.

        Like the ``hf`` backend, the string is encoded by ``tok_encode`` (BOS first by default) and the windows
        start from ``prefix_token_id`` (BOS again): ``python -m evaluation perplexity`` encodes without it.
        """
        documents = [self.tok_encode(req.args[0]) for req in requests]
        totals = rolling_loglikelihoods(self.runner, documents, prefix=self.prefix_token_id,
                                        batch_size=self.batch_size_per_forward)
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, ``do_sample``) continuations cut at lm-eval's stop strings, grouped by kwargs."""
        by_kwargs: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        out: list[str] = [""] * len(requests)
        for indices in by_kwargs.values():
            contexts = [requests[i].args[0] for i in indices]
            for i, text in zip(indices, self._generate_group(contexts, dict(requests[indices[0]].args[1]))):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate_group(self, contexts: Sequence[str], gen_kwargs: dict[str, Any]) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
        max_new = int(kwargs.pop("max_gen_toks"))
        max_context = self.max_length - max_new
        if max_context < 1:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        top_p = float(kwargs.get("top_p", 1.0) or 1.0)
        prompts = [self.tok_encode(c, left_truncate_len=max_context) for c in contexts]
        groups = self.runner.groups
        mine = groups.my_share([len(p) + max_new for p in prompts])
        order = sorted(mine, key=lambda i: (-len(prompts[i]), i))
        texts: dict[int, str] = {}
        for start in range(0, len(order), self.batch_size_per_forward):
            chunk = order[start : start + self.batch_size_per_forward]
            batch_prompts = [prompts[i] for i in chunk]
            tokens = generate(self.runner.model, batch_prompts, max_new_tokens=max_new, temperature=temperature,
                              top_p=top_p, stop_ids=(self.eot_token_id,), pad_id=self.llama_tokenizer.pad_id,
                              row_seeds=[int(kwargs.get("seed", 0)) * 1_000_003 + i for i in chunk]
                              if temperature > 0 else None,
                              logits_fn=self.runner.logits,
                              stop_fn=StopStrings(self.llama_tokenizer, until, len(chunk)))
            for i, ids in zip(chunk, tokens, strict=True):
                texts[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
        mine_sorted = sorted(texts)
        return groups.gather_by_index(mine_sorted, [texts[i] for i in mine_sorted], total=len(prompts))

