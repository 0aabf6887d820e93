"""Unit tests of evaluation/: scoring against a plain full forward, DP split, rolling windows, stop strings, tasks.

No shared data needed (a seeded debug model and synthetic token ids); the lm-eval parity on real benchmarks is
``tests/parity/test_eval_parity.py``. Run: ``pytest tests/unit/test_eval_scoring.py`` (~10 s).
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

from evaluation.parallel import balanced_split
from evaluation.scoring import LlamaRunner, plan_groups, rolling_windows, score_requests
from model import kernels
from model.config import get_config
from model.generate import generate
from model.llama import Llama, init_llama_weights

pytestmark = pytest.mark.timeout(120)
MAX_LEN = 24


@pytest.fixture(scope="module")
def runner() -> LlamaRunner:
    cfg = dataclasses.replace(get_config("debug_tiny"), max_seq_len=MAX_LEN)
    model = Llama(cfg)
    init_llama_weights(model, seed=3)
    return LlamaRunner(model.eval())


def reference(runner: LlamaRunner, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """lm-eval's hf backend's computation, written out: one unpadded full forward, eager formulas."""
    whole = (context + continuation)[-(MAX_LEN + 1):]
    with torch.no_grad(), kernels.disabled():
        logits = runner.model(torch.tensor(whole[:-1])[None])[0, -len(continuation):]
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def synthetic_requests(seed: int) -> list[tuple[list[int], list[int]]]:
    """Multiple-choice-like groups (shared contexts, mixed lengths incl. 1-token), singles, and over-long ones."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(3, 512) for _ in range(n)]  # noqa: E731
    requests = []
    for _ in range(5):  # shared contexts with 2-4 continuations of 1-6 tokens
        ctx = [1] + tokens(rng.randrange(1, 12))
        requests += [(ctx, tokens(rng.randrange(1, 7))) for _ in range(rng.randrange(2, 5))]
    requests += [([1] + tokens(rng.randrange(1, 10)), tokens(rng.randrange(1, 8))) for _ in range(6)]
    ctx = [1] + tokens(8)
    requests += [(ctx, [7]), (ctx, [9]), (ctx, [11])]  # all one-token continuations: the plain path
    start, ending = [1] + tokens(9), tokens(4)  # WinoGrande-like: contexts differing at the end, one continuation
    requests += [(start + [5], ending), (start + [6, 7], ending)]
    long_ctx = [1] + tokens(30)  # longer than the window: left-truncated as lm-eval does
    requests += [(long_ctx, tokens(3)), (long_ctx, tokens(5)), ([1] + tokens(40), tokens(MAX_LEN))]
    rng.shuffle(requests)
    return requests


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_score_requests_equals_one_full_forward_per_request(runner: LlamaRunner, batch_size: int) -> None:
    requests = synthetic_requests(seed=batch_size)
    groups = plan_groups(requests, max_length=MAX_LEN, max_members=batch_size)
    shared = [g for g in groups if len(g.members) > 1]
    if batch_size > 1:  # the KV-cache path is exercised, also with a prefix shorter than a context
        # (``start`` is the last context position: a prefix of at most that many tokens ends inside the context)
        assert any(g.needs_rest for g in shared) and any(g.prefix_len <= min(m.start for m in g.members)
                                                        for g in shared)
    got = score_requests(runner, requests, batch_size=batch_size)
    for (ctx, cont), (logprob, greedy) in zip(requests, got, strict=True):
        want_logprob, want_greedy = reference(runner, ctx, cont)
        assert logprob == pytest.approx(want_logprob, abs=2e-5), (len(ctx), len(cont))
        assert greedy == want_greedy


def test_greedy_flag_is_true_for_the_models_own_greedy_continuation(runner: LlamaRunner) -> None:
    prompt = [1, 17, 42, 99]
    greedy = generate(runner.model, [prompt], max_new_tokens=5)[0]
    (_, is_greedy), (_, perturbed) = score_requests(runner, [(prompt, greedy), (prompt, greedy[:-1] + [
        (greedy[-1] + 1) % 512])], batch_size=4)
    assert is_greedy and not perturbed


def test_plan_groups_shares_long_prefixes_only() -> None:
    common = list(range(10, 30))
    requests = [([1, *common, 5], [8, 9]), ([1, *common, 6], [8, 9]), ([1, 2, 3], [4]), ([1, 2, 7], [4])]
    groups = plan_groups(requests, max_length=64, max_members=8)
    by_size = sorted(groups, key=lambda g: -len(g.members))
    assert [m.index for m in by_size[0].members] == [0, 1] and by_size[0].prefix_len == 21
    assert all(len(g.members) == 1 for g in by_size[1:])  # [1, 2] is too short a prefix to share
    assert sum(len(g.members) for g in groups) == 4


def test_plan_groups_rejects_empty_and_overlong_requests() -> None:
    with pytest.raises(ValueError, match="empty context"):
        plan_groups([([], [5])], max_length=8, max_members=4)
    with pytest.raises(ValueError, match="exceeds the model's max_length 8"):
        plan_groups([([1], list(range(9)))], max_length=8, max_members=4)


def test_balanced_split_covers_every_item_once_and_balances_cost() -> None:
    costs = [random.Random(0).randrange(1, 100) for _ in range(101)]
    parts = balanced_split(costs, parts=4)
    assert sorted(i for p in parts for i in p) == list(range(101))
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs)
    assert parts == balanced_split(costs, parts=4)  # a pure function: every rank plans the same split


@pytest.mark.parametrize("context_len", [1, 5])
def test_rolling_windows_predict_every_token_once(context_len: int) -> None:
    tokens = list(range(10, 60))
    windows = rolling_windows(tokens, prefix=1, max_length=16, context_len=context_len)
    assert [t for _, cont in windows for t in cont] == tokens
    assert windows[0][0] == [1]
    for ctx, cont in windows:
        assert len(ctx) + len(cont) <= 16 + 1
    if context_len > 1:
        assert all(len(ctx) >= context_len - 1 for ctx, _ in windows[1:])


def test_rolling_loglikelihood_is_the_sum_over_windows(runner: LlamaRunner) -> None:
    from evaluation.scoring import rolling_loglikelihoods

    doc = [random.Random(1).randrange(3, 512) for _ in range(60)]
    total = rolling_loglikelihoods(runner, [doc], prefix=1, batch_size=4)[0]
    want = sum(reference(runner, ctx, cont)[0] for ctx, cont in rolling_windows(doc, prefix=1, max_length=MAX_LEN))
    assert total == pytest.approx(want, abs=1e-4)


def test_generate_stop_fn_ends_rows_and_keeps_the_ending_token(runner: LlamaRunner) -> None:
    prompts = [[1, 5, 6], [1, 7]]
    full = generate(runner.model, prompts, max_new_tokens=8)
    calls = {"n": 0}

    def stop_second_row_at_step_3(step_tokens: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.tensor([False, calls["n"] == 3])

    cut = generate(runner.model, prompts, max_new_tokens=8, stop_fn=stop_second_row_at_step_3)
    assert cut[0] == full[0] and cut[1] == full[1][:3]


def test_stop_strings_end_a_row_when_its_text_contains_one() -> None:
    from evaluation.adapter import StopStrings

    class Chars:  # a tokenizer whose ids are characters
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

        def decode(self, ids: list[int]) -> str:
            return "".join(map(chr, ids))

    stop = StopStrings(Chars(), ["\n\n", ""], batch=2)
    ended = [stop(torch.tensor([ord(a), ord(b)])).tolist() for a, b in zip("ab\n\nc", "xyzzz")]
    assert ended[3] == [True, False] and not any(e[1] for e in ended)


def test_task_templates_render_and_check(tmp_path: Path) -> None:
    from evaluation.tasks import SHARED_TASKS, TaskError, check_tasks, render_tasks, task_manager, templates

    assert set(SHARED_TASKS) | {"wikitext"} == set(templates())
    render_tasks(tmp_path / "data", tmp_path / "rendered")
    text = (tmp_path / "rendered" / "hellaswag.yaml").read_text()
    assert str((tmp_path / "data").resolve()) + "/eval/hellaswag/hellaswag_val.jsonl.gz" in text
    assert "${LLAMA_DATA_DIR}" not in text
    manager = task_manager(data_dir=tmp_path / "data", rendered_dir=tmp_path / "r2")
    with pytest.raises(TaskError, match=r"unknown task\(s\) 'hellaswagg'.*hellaswag"):
        check_tasks(["piqa", "hellaswagg"], manager=manager)
    with pytest.raises(TaskError, match=r"task 'piqa' needs .*/eval/piqa/valid.jsonl \(not found\)"):
        check_tasks(["piqa"], manager=manager)


def test_perplexity_summary_uses_lm_evals_formulas() -> None:
    from evaluation.perplexity import Document, summarize

    docs = [Document("a bb ccc"), Document("dd\u00e9")]  # 3 + 1 words, 8 + 4 bytes
    result = summarize([-6.0, -2.0], docs, [4, 2])
    assert result["words"] == 4 and result["bytes"] == 12 and result["tokens"] == 6
    assert result["word_perplexity"] == pytest.approx(math.exp(8 / 4))
    assert result["byte_perplexity"] == pytest.approx(math.exp(8 / 12))
    assert result["bits_per_byte"] == pytest.approx(8 / 12 / math.log(2))
    assert result["token_perplexity"] == pytest.approx(math.exp(8 / 6))
