"""The lm-eval adapter under torchrun: DP2 and TP2 give the single-process answers (one 2-process launch, gloo).

``run_eval_layouts.py`` evaluates stories260K on every shared task, WikiText-2 and a generation task in one
launch: single process (rank 0 alone), DP2 (requests split over the two ranks, results gathered) and TP2 (each
rank holds half of every layer and of the vocabulary; logits gathered at the scored positions only). Acceptance
(with ``tests/parity/test_eval_parity.py``, single process == lm-eval's hf backend): identical accuracies,
per-sample log-likelihoods within 1e-4 (+1e-6 relative), identical generated text, identical perplexity figures,
and both ranks of a layout return the same answers. In-loop: a TP2 pretraining run with the DeepSpeed engine logs
``[eval]`` benchmarks of its live sharded model equal to an evaluation of the weights it exports.
Run: ``pytest tests/distributed/test_eval_parallel.py`` (~1 min on 2 cores; skips without the shared data).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require_file
from tests.eval_helpers import (
    assert_same_metrics,
    assert_same_samples,
    export_stories260k,
    write_generation_task,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
RUNNER = REPO_ROOT / "tests" / "distributed" / "run_eval_layouts.py"
LAYOUTS = ("dp2", "tp2")


@pytest.fixture(scope="module")
def runs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_file(shared_data / "checkpoints/stories260K/stories260K.bin")
    out = tmp_path_factory.mktemp("eval_layouts")
    native, _, tokenizer = export_stories260k(shared_data, out)
    user_tasks = write_generation_task(out / "user_tasks", shared_data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(RUNNER),
           str(out), str(native), str(tokenizer), str(shared_data), str(user_tasks)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def _load(runs: Path, name: str) -> dict:
    return json.loads((runs / f"{name}.json").read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_single_process(runs: Path, layout: str) -> None:
    single = _load(runs, "single.rank0")
    for rank in (0, 1):
        ours = _load(runs, f"{layout}.rank{rank}")
        assert ours["layout"] == {"tp": 2 if layout == "tp2" else 1, "dp": 2 if layout == "dp2" else 1}
        assert_same_metrics(ours["metrics"], single["metrics"], label=f"{layout} rank {rank}")
        assert_same_samples(ours["samples"], single["samples"], label=f"{layout} rank {rank}")
        for key in ("tokens", "words", "bytes"):
            assert ours["perplexity"][key] == single["perplexity"][key]
        for key in ("loglikelihood", "word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert math.isclose(ours["perplexity"][key], single["perplexity"][key], rel_tol=1e-6), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rank_returns_the_same_answers(runs: Path, layout: str) -> None:
    rank0, rank1 = _load(runs, f"{layout}.rank0"), _load(runs, f"{layout}.rank1")
    assert rank0["samples"] == rank1["samples"] and rank0["metrics"] == rank1["metrics"]


def test_in_loop_eval_of_the_live_tp2_model_equals_its_export(runs: Path, shared_data: Path) -> None:
    from evaluation.adapter import LlamaLM
    from evaluation.cli import evaluate_tasks
    from evaluation.perplexity import document_perplexity, read_documents
    from evaluation.tasks import task_manager
    from tests.distributed.run_eval_layouts import IN_LOOP_TASKS, in_loop_config

    cfg = in_loop_config(runs, shared_data / "checkpoints/stories260K/tok512.model", shared_data)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    bench = [r for r in records if r.get("type") == "benchmark"]
    assert [r["step"] for r in bench] == [2]
    lm = LlamaLM.from_checkpoint(cfg.run_dir / "final_model", tokenizer=cfg.eval.tokenizer, batch_size=4)
    results = evaluate_tasks(lm, IN_LOOP_TASKS.split(","), manager=task_manager(data_dir=shared_data), limit=3,
                             num_fewshot=None, log_samples=False, bootstrap_iters=0, seed=cfg.train.seed)
    for task in IN_LOOP_TASKS.split(","):
        assert bench[0][f"eval/{task}/acc"] == results["results"][task]["acc,none"], task
    docs = list(read_documents(Path(cfg.eval.perplexity_data), split="lines", text_field="text",
                               tokenizer=lm.llama_tokenizer))[:3]
    ppl = document_perplexity(lm.runner, lm.llama_tokenizer, docs, batch_size=4)
    assert math.isclose(bench[0]["eval/perplexity/bits_per_byte"], ppl["bits_per_byte"], rel_tol=1e-5)
