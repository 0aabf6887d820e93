"""One 2-process launch that evaluates stories260K single-process, at DP2 and at TP2 (the lm-eval adapter).

    torchrun --standalone --nproc-per-node 2 tests/distributed/run_eval_layouts.py OUT NATIVE_DIR TOKENIZER \
        DATA_DIR USER_TASKS

Writes ``OUT/<layout>.rank<R>.json`` for layouts ``single`` (rank 0 alone, no collective), ``dp2`` and ``tp2``:
every sample's responses, the metrics, and ``evaluation perplexity`` figures on two WikiText articles. Then a
tiny pretraining run at TP2 with the real engine and ``[eval]`` (benchmarks on the live sharded model) into
``OUT/train_tp2``. ``tests/distributed/test_eval_parallel.py`` compares them.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from evaluation.adapter import LlamaLM
from evaluation.cli import evaluate_tasks
from evaluation.parallel import EvalGroups
from evaluation.perplexity import document_perplexity, read_documents
from evaluation.tasks import task_manager
from tests.eval_helpers import SAMPLES, SHORT_WIKITEXT_ARTICLES, TASKS, metrics, per_sample
from train.config import RunConfig
from train.loop import train
from train.topology import Topology

IN_LOOP_TASKS = "boolq,piqa"


def in_loop_config(out: Path, tokenizer: Path, data: Path) -> RunConfig:
    """A 2-step TP2 pretraining run whose [eval] runs at its last step (tests read it back)."""
    return RunConfig.from_toml(str(Path(__file__).resolve().parents[2] / "configs/pretrain/tiny_cpu.toml"), [
        f"--run.dir={out / 'train_tp2'}", "--train.steps=2", "--checkpoint.every=0", "--train.eval_every=0",
        "--parallel.tp=2", "--eval.every=2", f"--eval.tasks={IN_LOOP_TASKS}", "--eval.limit=3",
        f"--eval.tokenizer={tokenizer}", f"--eval.data_dir={data}", "--eval.batch_size=4",
        f"--eval.perplexity_data={data / 'wikipedia/wikitext-2-raw.test.txt'}", "--eval.perplexity_split=lines",
        "--eval.perplexity_docs=3"])


def evaluate(groups: EvalGroups, *, native: Path, tokenizer: Path, data: Path, manager: object) -> dict:
    lm = LlamaLM.from_checkpoint(native, tokenizer=tokenizer, groups=groups, batch_size=4)
    results = evaluate_tasks(lm, TASKS, manager=manager, limit=None, samples=SAMPLES, num_fewshot=None,
                             log_samples=True, bootstrap_iters=0, seed=1234)
    articles = list(read_documents(data / "wikipedia/wikitext-2-raw.test.txt", split="wikitext-articles",
                                   text_field="text", tokenizer=lm.llama_tokenizer))
    docs = [articles[i] for i in SHORT_WIKITEXT_ARTICLES[1:]]
    ppl = document_perplexity(lm.runner, lm.llama_tokenizer, docs, batch_size=2)
    return {"samples": per_sample(results), "metrics": metrics(results), "perplexity": ppl,
            "layout": {"tp": groups.tp_size, "dp": groups.dp_size}}


def main() -> None:
    out, native, tokenizer, data, user_tasks = (Path(a) for a in sys.argv[1:6])
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = task_manager(data_dir=data, include_path=[user_tasks])
    kwargs = {"native": native, "tokenizer": tokenizer, "data": data, "manager": manager}
    topo = Topology.initialize(tp=1, timeout_s=900)
    rank = topo.global_rank
    if rank == 0:  # the single-process reference, inside the launch (rank 1 waits at the barrier)
        (out / "single.rank0.json").write_text(json.dumps(evaluate(EvalGroups(), **kwargs)))
    dist.barrier()
    for layout, tp in (("dp2", 1), ("tp2", 2)):
        groups = EvalGroups.from_topology(Topology.initialize(tp=tp, timeout_s=900))
        result = evaluate(groups, **kwargs)
        (out / f"{layout}.rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    train(in_loop_config(out, tokenizer, data), print_fn=lambda *a, **k: None)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
