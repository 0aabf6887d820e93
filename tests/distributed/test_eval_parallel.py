"""The lm-eval adapter under torchrun: DP2 and TP2 give the single-process answers (one 2-process launch, gloo).

``run_eval_layouts.py`` evaluates stories260K on every shared task, WikiText-2 and a generation task in one
launch: single process (rank 0 alone), DP2 (requests split over the two ranks, results gathered) and TP2 (each
rank holds half of every layer and of the vocabulary; logits gathered at the scored positions only). Acceptance
(with ``tests/parity/test_eval_parity.py``, single process == lm-eval's hf backend): identical accuracies,
per-sample log-likelihoods within 1e-4 (+1e-6 relative), identical generated text, identical perplexity figures,
and both ranks of a layout return the same answers.
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
