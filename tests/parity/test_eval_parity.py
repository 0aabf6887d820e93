"""Parity of our lm-eval adapter with lm-eval's own ``hf`` backend on the same weights (fp32, CPU).

The real stories260K checkpoint is exported by our converter to our native format (read by our adapter) and to
Hugging Face's (read by ``transformers`` through lm-eval's ``HFLM``); both run every shared task (LAMBADA,
HellaSwag, PIQA, ARC-Easy, WinoGrande, BoolQ), WikiText-2 (``loglikelihood_rolling``) and a greedy generation
task (``generate_until``) on a few documents each (``tests/eval_helpers.py`` ``SAMPLES``). Acceptance: identical accuracies, per-sample
log-likelihoods within 1e-4 (+1e-6 relative for sums above ~100 nats, see ``tests/eval_helpers.py``), identical
greedy flags and generated text. Also: ``python -m evaluation perplexity`` equals the hf backend's rolling
log-likelihood (without its second BOS), and the ``run`` command writes lm-eval's results JSON.
Run: ``pytest tests/parity/test_eval_parity.py`` (~1 min on 2 cores; skips without the shared data).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_file
from tests.eval_helpers import (
    SAMPLES,
    TASKS,
    assert_same_metrics,
    assert_same_samples,
    export_stories260k,
    metrics,
    per_sample,
    write_generation_task,
)

pytestmark = pytest.mark.timeout(600)
logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def setup(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_file(shared_data / "checkpoints/stories260K/stories260K.bin")
    from evaluation.tasks import check_tasks, task_manager

    out = tmp_path_factory.mktemp("eval_parity")
    native, hf, tokenizer = export_stories260k(shared_data, out)
    user_tasks = write_generation_task(out / "user_tasks", shared_data)
    manager = task_manager(data_dir=shared_data, include_path=[user_tasks], rendered_dir=out / "rendered")
    check_tasks(TASKS, manager=manager)
    return {"native": native, "hf": hf, "tokenizer": tokenizer, "manager": manager, "out": out,
            "user_tasks": user_tasks, "data": shared_data}


def _evaluate(lm: Any, manager: Any) -> dict[str, Any]:
    from evaluation.cli import evaluate_tasks

    return evaluate_tasks(lm, TASKS, manager=manager, limit=None, samples=SAMPLES, num_fewshot=None,
                          log_samples=True, bootstrap_iters=0, seed=1234)


@pytest.fixture(scope="module")
def ours(setup: dict[str, Any]) -> dict[str, Any]:
    from evaluation.adapter import LlamaLM

    lm = LlamaLM.from_checkpoint(setup["native"], tokenizer=setup["tokenizer"], batch_size=8)
    return _evaluate(lm, setup["manager"])


@pytest.fixture(scope="module")
def reference(setup: dict[str, Any]) -> dict[str, Any]:
    from evaluation.hf_peer import hf_lm

    return _evaluate(hf_lm(setup["hf"], tokenizer=setup["tokenizer"], batch_size=8), setup["manager"])


def test_tokenizers_agree_on_every_request(setup: dict[str, Any], ours: dict[str, Any],
                                           reference: dict[str, Any]) -> None:
    """The premise of the comparison: the hf peer's tokenizer gives our token ids on every prompt we score."""
    from evaluation.hf_peer import hf_tokenizer
    from model.tokenizer import load_tokenizer

    hf, mine = hf_tokenizer(setup["tokenizer"]), load_tokenizer(setup["tokenizer"])
    texts = {arg for samples in ours["samples"].values() for s in samples for a in s["arguments"] for arg in a
             if isinstance(arg, str)}
    assert len(texts) > 100
    for text in texts:
        assert hf.encode(text) == mine.encode(text, bos=True), text[:80]


def test_same_accuracies_on_every_task(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    assert set(metrics(reference)) == set(TASKS)
    assert_same_metrics(metrics(ours), metrics(reference), label="single process vs hf")
    assert all(ours["n-samples"][t]["effective"] == len(SAMPLES[t]) for t in TASKS)


def test_same_per_sample_loglikelihoods_and_generations(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    worst = assert_same_samples(per_sample(ours), per_sample(reference), label="single process vs hf")
    print(f"largest per-sample log-likelihood difference vs hf: {worst:.2e}")


def test_perplexity_command_equals_hf_rolling_loglikelihood(setup: dict[str, Any]) -> None:
    """``evaluation perplexity`` (no BOS inside the document) vs ``HFLM(add_bos_token=False)``: same windows."""
    from lm_eval.api.instance import Instance

    from evaluation.adapter import LlamaLM
    from evaluation.hf_peer import hf_lm
    from evaluation.perplexity import document_perplexity, read_documents

    wiki = require_file(setup["data"] / "wikipedia/wikitext-2-raw.test.txt")
    lm = LlamaLM.from_checkpoint(setup["native"], tokenizer=setup["tokenizer"], batch_size=8)
    articles = list(read_documents(wiki, split="wikitext-articles", text_field="text", tokenizer=lm.llama_tokenizer))
    docs = [articles[i] for i in SAMPLES["wikitext"]]
    result = document_perplexity(lm.runner, lm.llama_tokenizer, docs, batch_size=8)
    peer = hf_lm(setup["hf"], tokenizer=setup["tokenizer"], batch_size=8, add_bos_token=False)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d.score_text,), idx=0)
                for d in docs]
    hf_total = sum(peer.loglikelihood_rolling(requests, disable_tqdm=True))
    assert result["loglikelihood"] == pytest.approx(hf_total, rel=1e-6)
    assert result["tokens"] == sum(len(lm.llama_tokenizer.encode(d.score_text)) for d in docs)


def test_run_command_writes_results_json(setup: dict[str, Any], tmp_path: Path) -> None:
    from evaluation.cli import main

    out = tmp_path / "out.json"
    code = main(["run", "--checkpoint", str(setup["native"]), "--tokenizer", str(setup["tokenizer"]),
                 "--tasks", "boolq,lambada_greedy", "--include-path", str(setup["user_tasks"]),
                 "--data-dir", str(setup["data"]), "--limit", "2", "--batch-size", "4", "--log-samples",
                 "--bootstrap-iters", "0", "--output", str(out)])
    assert code == 0
    written = json.loads(out.read_text())
    assert set(written["results"]) == {"boolq", "lambada_greedy"}
    assert len(written["samples"]["boolq"]) == 2 and written["samples"]["boolq"][0]["resps"]
    assert written["evaluation"]["examples"] == 4 and written["evaluation"]["tp"] == 1
    assert main(["run", "--checkpoint", str(setup["native"]), "--tasks", "boolq,nope", "--output",
                 str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
