"""lm-eval's ``--apply_chat_template`` on our adapter: prompts as dialogs in Meta's chat formats, token-exact.

``LlamaLM.apply_chat_template`` renders a dialog with ``model.chat`` and ``tok_encode`` turns the rendered text
back into exactly those ids (special tokens included), also when lm-eval appends a continuation to it; a
generation task run with the chat format generates from those ids. Tiny random models (the formats are what is
checked, not the answers) with stories260K's SentencePiece tokenizer (llama2 format) and the Llama 3 tiktoken
tokenizer (llama3 format). Run: ``pytest tests/unit/test_eval_chat_template.py`` (~20 s; skips without the data).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation.adapter import LlamaLM
from evaluation.scoring import LlamaRunner
from model.chat import encode_chat, parse_messages
from model.config import LlamaConfig
from model.generate import generate
from model.llama import Llama
from model.tokenizer import load_tokenizer
from tests.conftest import require_file
from tests.eval_helpers import GENERATION_TASK, write_generation_task

pytestmark = pytest.mark.timeout(300)
DIALOG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Paris?"},
          {"role": "assistant", "content": "In France."}, {"role": "user", "content": "And Rome?"}]


def _lm(tokenizer_file: Path, template: str) -> LlamaLM:
    tok = load_tokenizer(tokenizer_file)
    torch.manual_seed(0)
    cfg = LlamaConfig(name="chat_probe", dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                      max_seq_len=1024)  # LAMBADA passages whole (no left truncation)
    return LlamaLM(LlamaRunner(Llama(cfg).eval()), tok, batch_size=2, max_gen_toks=8, chat_format=template)


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def lm(request: pytest.FixtureRequest, shared_data: Path) -> LlamaLM:
    file = {"llama2": "checkpoints/stories260K/tok512.model", "llama3": "tokenizers/llama3/tokenizer.model"}
    return _lm(require_file(shared_data / file[request.param]), request.param)


def test_rendered_dialog_encodes_to_the_chat_format_ids(lm: LlamaLM) -> None:
    want = encode_chat(lm.llama_tokenizer, parse_messages(DIALOG), template=lm.chat_format,
                       add_generation_prompt=True).ids
    rendered = lm.apply_chat_template(DIALOG)
    assert lm.tok_encode(rendered) == want and rendered == rendered.rstrip()
    assert "Rome?" in rendered
    # lm-eval's loglikelihood: (context, continuation) -> the dialog's ids, then the continuation's own.
    context, continuation = lm._encode_pair(rendered, " Near the Tiber.")
    assert context == want
    assert continuation == lm.llama_tokenizer.encode(" Near the Tiber.", bos=False)
    # Llama 3's header ends in "\n\n": cut from the rendered text, kept in the ids, not encoded twice.
    if lm.chat_format == "llama3":
        assert want[-1] != lm.llama_tokenizer.special_tokens["<|end_header_id|>"]
        assert lm.tok_encode(rendered + "\n\nIn Italy.") == want + lm.llama_tokenizer.encode("In Italy.", bos=False)
    # A prefill (gen_prefix): the assistant's answer continues the given text.
    prefilled = lm.apply_chat_template([*DIALOG, {"role": "assistant", "content": "Answer:"}],
                                       add_generation_prompt=False)
    assert lm.tok_encode(prefilled) == want + lm.llama_tokenizer.encode("Answer:", bos=False)


def test_a_generation_task_generates_from_the_chat_ids(lm: LlamaLM, shared_data: Path, tmp_path: Path) -> None:
    from evaluation.cli import evaluate_tasks
    from evaluation.tasks import task_manager

    folder = write_generation_task(tmp_path / "tasks", shared_data)
    results = evaluate_tasks(lm, [GENERATION_TASK], manager=task_manager(data_dir=shared_data, include_path=[folder]),
                             limit=2, num_fewshot=None, log_samples=True, bootstrap_iters=0, seed=0,
                             apply_chat_template=True, system_instruction="Finish the text.")
    samples = sorted(results["samples"][GENERATION_TASK], key=lambda s: s["doc_id"])
    assert len(samples) == 2
    for sample in samples:
        context = sample["arguments"][0][0]  # (context, generation kwargs) of the one request
        messages = [{"role": "system", "content": "Finish the text."},
                    {"role": "user", "content": " ".join(sample["doc"]["text"].split(" ")[:-1])}]
        ids = encode_chat(lm.llama_tokenizer, parse_messages(messages), template=lm.chat_format,
                          add_generation_prompt=True).ids
        assert lm.tok_encode(context) == ids
        out = generate(lm.runner.model, [ids], max_new_tokens=12, stop_ids=(lm.eot_token_id,))[0]  # the YAML's
        text = lm.tok_decode(out)
        for stop in (".", "\n"):
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text
