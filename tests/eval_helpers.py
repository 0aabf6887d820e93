"""Shared pieces of the evaluation parity tests (single process vs lm-eval's hf backend, and TP2 / DP2 launches).

The model is the real stories260K checkpoint, exported by our converter to our native format and to Hugging
Face's; the tasks are our local benchmark tasks plus one greedy-generation task over LAMBADA (a user task given
by ``--include-path``), each limited to the first ``LIMIT`` documents (``SAMPLES``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from evaluation.tasks import PERPLEXITY_TASKS, SHARED_TASKS

LIMIT = 6
GENERATION_TASK = "lambada_greedy"
TASKS = [*SHARED_TASKS, *PERPLEXITY_TASKS, GENERATION_TASK]
# The first LIMIT documents of each task; for WikiText three short articles (70, 780 and 1,463 stories260K
# tokens: one window, two, three) instead of the first ones (3,400 to 14,000 tokens each), to keep CI fast.
SHORT_WIKITEXT_ARTICLES = [28, 29, 14]
SAMPLES = {task: SHORT_WIKITEXT_ARTICLES if task == "wikitext" else list(range(LIMIT)) for task in TASKS}
# fp32 sums of hundreds of token log-probs (|loglik| up to ~20,000 nats for a WikiText article) carry their own
# rounding: one ulp is 1.2e-4 at 1024 and 2e-3 at 16384. So |ours - hf| <= ATOL + RTOL * |hf| (RTOL ~ 8 ulp).
ATOL, RTOL = 1e-4, 1e-6

_GENERATION_YAML = """task: lambada_greedy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_dir}/eval/lambada/lambada_test.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
generation_kwargs:
  until: [".", "\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def export_stories260k(shared_data: Path, out: Path) -> tuple[Path, Path, Path]:
    """(native dir, Hugging Face dir, tokenizer file) of the real stories260K checkpoint, via our converter."""
    from model.checkpoints import load_checkpoint, save_checkpoint

    cfg, state_dict = load_checkpoint(shared_data / "checkpoints/stories260K/stories260K.bin")
    native, hf = out / "native", out / "hf"
    save_checkpoint(state_dict, cfg, native, format="native", overwrite=True)
    save_checkpoint(state_dict, cfg, hf, format="hf", overwrite=True)
    return native, hf, shared_data / "checkpoints/stories260K/tok512.model"


def write_generation_task(folder: Path, data_dir: Path) -> Path:
    """A user task folder (for ``--include-path``) with a greedy generation task: LAMBADA's last word."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{GENERATION_TASK}.yaml").write_text(_GENERATION_YAML.format(data_dir=data_dir.resolve()))
    return folder


def per_sample(results: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """Each task's samples in doc order: the raw model responses (log-likelihoods, greedy flags, or text)."""
    out = {}
    for task, samples in results["samples"].items():
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        out[task] = [[_plain(r[0]) for r in s["resps"]] for s in ordered]
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each task's metric values (no stderr, no alias)."""
    return {task: {k: v for k, v in r.items() if "," in k and "stderr" not in k}
            for task, r in results["results"].items()}


def assert_same_samples(ours: dict[str, list[list[Any]]], ref: dict[str, list[list[Any]]], *, label: str) -> float:
    """Every response equal: text exactly, greedy flags exactly, log-likelihoods within ATOL + RTOL|ref|.

    Returns the largest log-likelihood difference seen."""
    worst = 0.0
    assert sorted(ours) == sorted(ref), label
    for task in ref:
        assert len(ours[task]) == len(ref[task]), (label, task)
        for doc, (a_doc, b_doc) in enumerate(zip(ours[task], ref[task], strict=True)):
            for a, b in zip(a_doc, b_doc, strict=True):
                if isinstance(b, str):
                    assert a == b, (label, task, doc, a, b)
                    continue
                a_ll, b_ll = (a[0], b[0]) if isinstance(b, list) else (a, b)
                if isinstance(b, list):
                    assert a[1] == b[1], (label, task, doc, "is_greedy", a, b)
                worst = max(worst, abs(a_ll - b_ll))
                assert abs(a_ll - b_ll) <= ATOL + RTOL * abs(b_ll), (label, task, doc, a_ll, b_ll)
    return worst


def assert_same_metrics(ours: dict[str, dict[str, float]], ref: dict[str, dict[str, float]], *, label: str) -> None:
    """Accuracies identical; perplexity-type figures within 2e-4 relative (exp of mean log-likelihoods that
    agree to ~1e-4 per sample: a relative error of the same size)."""
    assert sorted(ours) == sorted(ref), label
    for task, values in ref.items():
        assert sorted(ours[task]) == sorted(values), (label, task)
        for key, want in values.items():
            got = ours[task][key]
            if key.startswith(("acc", "exact_match")):
                assert got == want, (label, task, key, got, want)
            else:
                assert math.isclose(got, want, rel_tol=2e-4), (label, task, key, got, want)
