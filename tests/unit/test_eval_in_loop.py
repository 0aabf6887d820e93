"""``[eval]`` in the training loop: benchmarks and perplexity on the live model, logged, plotted, checked early.

The real loop (``train.loop.train``) with the loop tests' local engine (plain PyTorch, TrainEngine's interface;
the DeepSpeed engine at TP2 is ``tests/distributed/test_eval_parallel.py``). The model is trained on synthetic
tokens, so its accuracy is noise: what is checked is that the record is there, is what an evaluation of the
exported weights gives, reaches the report, and that bad ``[eval]`` input stops the run before any training; an
SFT run (an alignment stage on the same loop, with the plain-PyTorch reference engine) logs them too.
Run: ``pytest tests/unit/test_eval_in_loop.py`` (~30 s; skips without the shared data).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_file
from tests.unit.test_train_loop import LocalEngine, single_topology
from train.config import RunConfig
from train.config_reader import ConfigError
from train.loop import train

pytestmark = pytest.mark.timeout(300)
TASKS = "boolq,piqa"


def _cfg(shared_data: Path, run_dir: Path, *extra: str) -> RunConfig:
    tokenizer = require_file(shared_data / "checkpoints/stories260K/tok512.model")
    wiki = require_file(shared_data / "wikipedia/wikitext-2-raw.test.txt")
    return RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", [
        f"--run.dir={run_dir}", "--train.steps=4", "--checkpoint.every=0", "--train.eval_every=0",
        "--train.log_every=100", "--eval.every=2", f"--eval.tasks={TASKS}", "--eval.limit=3",
        f"--eval.tokenizer={tokenizer}", f"--eval.data_dir={shared_data}", f"--eval.perplexity_data={wiki}",
        "--eval.perplexity_split=lines", "--eval.perplexity_docs=3", "--eval.batch_size=4", *extra])


def _train(cfg: RunConfig, engine_factory: Any = LocalEngine) -> Any:
    return train(cfg, engine_factory=engine_factory, topology_factory=single_topology,
                 print_fn=lambda *a, **k: None)


def test_benchmarks_are_logged_at_every_n_steps_and_match_the_exported_model(shared_data: Path,
                                                                              tmp_path: Path) -> None:
    cfg = _cfg(shared_data, tmp_path / "run")
    _train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    bench = [r for r in records if r.get("type") == "benchmark"]
    assert [r["step"] for r in bench] == [2, 4]
    for key in ("eval/boolq/acc", "eval/piqa/acc", "eval/piqa/acc_norm", "eval/perplexity/bits_per_byte",
                "eval/perplexity/token_perplexity", "eval/perplexity/word_perplexity"):
        assert all(math.isfinite(r[key]) for r in bench), key

    # The step-4 record is what an evaluation of the exported final weights gives.
    from evaluation.adapter import LlamaLM
    from evaluation.cli import evaluate_tasks
    from evaluation.perplexity import document_perplexity, read_documents
    from evaluation.tasks import task_manager

    lm = LlamaLM.from_checkpoint(tmp_path / "run/final_model", tokenizer=cfg.eval.tokenizer, batch_size=4)
    results = evaluate_tasks(lm, TASKS.split(","), manager=task_manager(data_dir=shared_data), limit=3,
                             num_fewshot=None, log_samples=False, bootstrap_iters=0, seed=cfg.train.seed)
    assert bench[-1]["eval/boolq/acc"] == results["results"]["boolq"]["acc,none"]
    assert bench[-1]["eval/piqa/acc_norm"] == results["results"]["piqa"]["acc_norm,none"]
    docs = list(read_documents(Path(cfg.eval.perplexity_data), split="lines", text_field="text",
                               tokenizer=lm.llama_tokenizer))[:3]
    ppl = document_perplexity(lm.runner, lm.llama_tokenizer, docs, batch_size=4)
    assert bench[-1]["eval/perplexity/bits_per_byte"] == pytest.approx(ppl["bits_per_byte"], rel=1e-5)

    from train.report import write_report

    out = write_report(tmp_path / "run")
    assert (out / "eval.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "Benchmarks during training" in summary and "boolq/acc" in summary


class NeverBuilt:
    """An engine factory that fails the test if the loop gets as far as building the engine."""

    def __init__(self, **_: Any) -> None:
        raise AssertionError("the engine was built: [eval] must be checked before")


@pytest.mark.parametrize(("extra", "message"), [
    (["--eval.tasks=boolq,hellaswagg"], r"unknown task\(s\) 'hellaswagg'"),
    (["--eval.data_dir=/nonexistent"], r"task 'boolq' needs /nonexistent/eval/boolq/.*\(not found\)"),
    (["--eval.perplexity_data=/nonexistent/held_out.txt"], r"eval.perplexity_data=/nonexistent/held_out.txt"),
    (["--eval.tokenizer=/nonexistent/tok.model"], r"tokenizer /nonexistent/tok.model: no such file"),
])
def test_bad_eval_input_stops_the_run_before_training(shared_data: Path, tmp_path: Path, extra: list[str],
                                                      message: str) -> None:
    cfg = _cfg(shared_data, tmp_path / "run", *extra)
    with pytest.raises(ConfigError, match=message):
        _train(cfg, engine_factory=NeverBuilt)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--parallel.pp=2"], "pipeline size 1"),
    (["--zero.stage=3"], "zero.stage=3"),
    (["--eval.tasks=", "--eval.perplexity_data="], "no eval.tasks and no eval.perplexity_data"),
])
def test_layouts_and_empty_eval_are_refused_by_validate(shared_data: Path, tmp_path: Path, extra: list[str],
                                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(shared_data, tmp_path, *extra).validate(world_size=2)


def test_eval_lists_round_trip_through_config_toml(shared_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(shared_data, tmp_path / "run")
    assert cfg.eval.tasks == ["boolq", "piqa"]
    cfg.save_toml(tmp_path / "c.toml")
    assert RunConfig.from_toml(tmp_path / "c.toml", []) == cfg


def test_an_sft_run_logs_benchmarks_of_the_model_it_fine_tunes(shared_data: Path, tmp_path: Path) -> None:
    """Alignment stages on the loop (SFT here; GAtt is the same loop) get [eval] too, on the model being tuned."""
    from evaluation.adapter import LlamaLM
    from evaluation.cli import evaluate_tasks
    from evaluation.perplexity import document_perplexity, read_documents
    from evaluation.tasks import task_manager
    from rlhf.sft.config import SFTConfig
    from rlhf.sft.train import run_sft
    from rlhf.synthetic import synthetic_tokenizer, write_synthetic_preferences
    from train.reference import ReferenceEngine, single_process_topology

    synthetic_tokenizer(tmp_path / "tok")
    write_synthetic_preferences(tmp_path / "prefs.jsonl", n=64, seed=0, graded=True)
    cfg = SFTConfig.from_toml(None, [
        "--model.name=debug_tiny", f"--data.tokenizer={tmp_path / 'tok.model'}", "--data.seq_len=128",
        f"--sft.files={tmp_path / 'prefs.jsonl'}", "--sft.epochs=1", "--train.global_batch_size=8",
        "--train.micro_batch_size=8", "--train.eval_every=0", "--checkpoint.every=0", "--logging.wandb=false",
        f"--run.dir={tmp_path / 'sft'}", "--eval.every=1000", "--eval.tasks=boolq", "--eval.limit=3",
        f"--eval.data_dir={shared_data}", "--eval.batch_size=4", "--eval.perplexity_split=lines",
        f"--eval.perplexity_data={shared_data / 'wikipedia/wikitext-2-raw.test.txt'}", "--eval.perplexity_docs=2"])
    result, _ = run_sft(cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology,
                        print_fn=lambda *a, **k: None)
    records = [json.loads(line) for line in (tmp_path / "sft/metrics.jsonl").read_text().splitlines()]
    bench = [r for r in records if r.get("type") == "benchmark"]
    assert [r["step"] for r in bench] == [result.last_step]  # every 1000 steps and after the last
    lm = LlamaLM.from_checkpoint(tmp_path / "sft/final_model", tokenizer=tmp_path / "tok.model", batch_size=4)
    results = evaluate_tasks(lm, ["boolq"], manager=task_manager(data_dir=shared_data), limit=3, num_fewshot=None,
                             log_samples=False, bootstrap_iters=0, seed=cfg.train.seed)
    assert bench[0]["eval/boolq/acc"] == results["results"]["boolq"]["acc,none"]
    docs = list(read_documents(Path(cfg.eval.perplexity_data), split="lines", text_field="text",
                               tokenizer=lm.llama_tokenizer))[:2]
    ppl = document_perplexity(lm.runner, lm.llama_tokenizer, docs, batch_size=4)
    assert bench[0]["eval/perplexity/bits_per_byte"] == pytest.approx(ppl["bits_per_byte"], rel=1e-5)
