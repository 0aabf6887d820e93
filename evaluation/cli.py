"""``python -m evaluation``: benchmarks through lm-evaluation-harness, perplexity, win rates.

    python -m evaluation run --checkpoint DIR --tokenizer TOK --tasks hellaswag,piqa,arc_easy,winogrande,boolq,\
lambada_openai [--include-path MY_TASKS] [--limit 100] [--batch-size 32] [--num-fewshot 0] --output out.json \
[--log-samples]
    torchrun --standalone --nproc-per-node 4 -m evaluation run --tp 2 ...       # TP 2 x DP 2 (gloo or NCCL)
    python -m evaluation tasks                                                  # our task names and their files
    python -m evaluation win-rate --policy PPO --baseline SFT --judge RM --prompts P.jsonl --output w.json

``run`` writes lm-eval's results dict (``results``, ``configs``, ``versions``, ``n-shot``, ``n-samples``, and with
``--log-samples`` every sample's arguments and log-likelihoods under ``samples``) plus an ``evaluation`` record
(checkpoint, layout, wall time, examples/s). Task names and data files are checked before the model is loaded.
Everything is offline: our tasks read ``$LLAMA_DATA_DIR`` (``--data-dir``), nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from evaluation.parallel import init_groups
from evaluation.results import count_examples, write_json
from evaluation.tasks import TaskError, check_tasks, data_files, default_data_dir, parse_task_list, templates
from model.chat import TEMPLATES


def _limit(text: str | None) -> int | float | None:
    """``--limit``: an integer number of documents per task, or a fraction below 1.0 (lm-eval's meaning)."""
    if text is None:
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit {text}: give a positive count or a fraction in (0, 1)")
    return int(value) if value >= 1 else value


def _quiet_lm_eval(*, output_rank: bool) -> None:
    """lm-eval logs every task's config warnings; keep them on the output rank only."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING if output_rank else logging.ERROR)


def evaluate_tasks(lm: Any, names: list[str], *, manager: Any, limit: int | float | None, num_fewshot: int | None,
                   log_samples: bool, bootstrap_iters: int, seed: int,
                   samples: dict[str, list[int]] | None = None, apply_chat_template: bool = False,
                   system_instruction: str | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on our adapter (every rank runs it; see ``evaluation.parallel``).

    ``samples``: instead of ``limit``, the document indices to score per task (lm-eval's own option).
    ``apply_chat_template``: prompts as dialogs in the adapter's ``chat_format`` (lm-eval's own option)."""
    import lm_eval

    # simple_evaluate returns its results only where LOCAL_RANK is 0 (its guess for "the TP rank that writes").
    # Our adapter gives every rank the same answers, and every rank gets the results (the training loop may act
    # on them on all ranks); the output file is still written by global rank 0 alone.
    local_rank = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, samples=samples, log_samples=log_samples,
            task_manager=manager, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, apply_chat_template=apply_chat_template,
            system_instruction=system_instruction)
    finally:
        if local_rank is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = local_rank
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def _run(args: argparse.Namespace) -> int:
    from evaluation.tasks import set_offline, task_manager

    set_offline()
    names = parse_task_list(args.tasks)
    rendered = Path(tempfile.mkdtemp(prefix="llama-eval-tasks-"))
    try:
        manager = task_manager(data_dir=args.data_dir, include_path=args.include_path,
                               include_defaults=args.lm_eval_tasks, rendered_dir=rendered)
        check_tasks(names, manager=manager)  # before any process group or model: bad input fails in seconds
        groups = init_groups(tp=args.tp)
        _quiet_lm_eval(output_rank=groups.is_output_rank)
        from evaluation.adapter import LlamaLM

        lm = LlamaLM.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, groups=groups,
                                     batch_size=args.batch_size, max_length=args.max_length,
                                     max_gen_toks=args.max_gen_toks, add_bos_token=not args.no_bos,
                                     chat_format=args.apply_chat_template)
        start = time.perf_counter()
        results = evaluate_tasks(lm, names, manager=manager, limit=args.limit, num_fewshot=args.num_fewshot,
                                 log_samples=args.log_samples, seed=args.seed,
                                 apply_chat_template=args.apply_chat_template is not None,
                                 system_instruction=args.system_instruction,
                                 bootstrap_iters=args.bootstrap_iters if groups.is_output_rank else 0)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(rendered, ignore_errors=True)
    examples = count_examples(results)
    results["evaluation"] = {
        "checkpoint": str(args.checkpoint), "tokenizer": str(lm.llama_tokenizer.path), "tasks": names,
        "tp": groups.tp_size, "dp": groups.dp_size, "batch_size": args.batch_size, "limit": args.limit,
        "wall_s": round(seconds, 3), "examples": examples, "examples_per_s": round(examples / seconds, 3)}
    if groups.is_output_rank:
        from lm_eval.utils import make_table

        print(make_table(results))
        write_json(args.output, results)
        print(f"wrote {args.output} ({examples} examples in {seconds:.1f} s, tp {groups.tp_size} dp {groups.dp_size})")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or default_data_dir())
    for name in sorted(templates()):
        files = data_files(name, data_dir)
        status = "ok" if all(p.exists() for p in files) else "MISSING"
        print(f"{name:<16} {status:<8} {', '.join(str(p) for p in files)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="lm-eval tasks on a checkpoint (our model, our tokenizer)")
    run.add_argument("--checkpoint", required=True, type=Path, help="native or Hugging Face checkpoint directory")
    run.add_argument("--tokenizer", type=Path, help="tokenizer file (default: DIR/tokenizer.model)")
    run.add_argument("--tasks", required=True, help="comma-separated task names (`python -m evaluation tasks`)")
    run.add_argument("--include-path", action="append", default=[], type=Path,
                     help="a folder of your own lm-eval task YAMLs (repeatable; indexed after ours)")
    run.add_argument("--lm-eval-tasks", action="store_true",
                     help="also index lm-eval's built-in tasks (offline they need the Hugging Face dataset cache)")
    run.add_argument("--data-dir", type=Path, help="directory holding eval/ and wikipedia/ (default $LLAMA_DATA_DIR)")
    run.add_argument("--limit", type=_limit, help="documents per task (or a fraction < 1)")
    run.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    run.add_argument("--num-fewshot", type=int, default=None)
    run.add_argument("--output", required=True, type=Path, help="results JSON")
    run.add_argument("--log-samples", action="store_true", help="add every sample's log-likelihoods to the JSON")
    run.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun; the rest is DP)")
    run.add_argument("--max-length", type=int, help="context window in tokens (default: the model's max_seq_len)")
    run.add_argument("--max-gen-toks", type=int, default=256, help="generation tasks: new tokens at most")
    run.add_argument("--no-bos", action="store_true", help="do not start every encoded text with BOS")
    run.add_argument("--apply-chat-template", choices=TEMPLATES,
                     help="prompts as dialogs in this chat format (model.chat; generation tasks of chat models)")
    run.add_argument("--system-instruction", help="with --apply-chat-template: the system message")
    run.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's bootstrap for stderr (0: off)")
    run.add_argument("--seed", type=int, default=1234)
    run.set_defaults(func=_run)

    tasks = sub.add_parser("tasks", help="our local task names and whether their data files are present")
    tasks.add_argument("--data-dir", type=Path)
    tasks.set_defaults(func=_tasks)

    from evaluation.perplexity import add_parser as add_perplexity

    add_perplexity(sub)
    from evaluation.win_rate import add_parser as add_win_rate

    add_win_rate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TaskError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
