"""Benchmark: lm-eval examples/s of our adapter vs lm-eval's own ``hf`` backend, same weights, same tasks, one run.

    python benchmarks/bench_eval.py                                   # stories260K (real checkpoint), 6 tasks
    python benchmarks/bench_eval.py --checkpoint runs/quickstart_real/final_model \
        --tokenizer runs/quickstart_real/tokenizer/tok8192.model --label quickstart_15m
    python benchmarks/bench_eval.py --random-model bench_25m --vocab-size 32000 \
        --tokenizer ../shared/data/tokenizers/llama2/tokenizer.model --label random_56m_llama2tok

The checkpoint is exported by our converter to Hugging Face format; lm-eval's ``HFLM`` runs it with
``transformers`` (fp32, CPU) and our ``evaluation.adapter.LlamaLM`` runs the native one. Both evaluate the shared
tasks (LAMBADA, HellaSwag, PIQA, ARC-Easy, WinoGrande, BoolQ; first ``--limit`` documents each) through
``lm_eval.simple_evaluate``, with the same batch size, alternating ours / hf ``--repeats`` times after one warm-up
round each. Before any timing counts, the two must agree (identical accuracies, per-sample log-likelihoods within
1e-4 + 1e-6 relative); otherwise the script stops.

Reported per backend: median seconds of the whole evaluation (``wall``: task building, requests, model, metrics),
of the model calls alone (``model``: ``loglikelihood``), and the CPU seconds of those calls (``model_cpu``, one
torch thread by default: on a shared machine the stable measure), examples/s from each, and the speedup ours / hf
(goal >= 2x). JSON in ``benchmarks/results/bench_eval_<label>.json`` with the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.tasks import SHARED_TASKS, default_data_dir  # noqa: E402


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="native checkpoint directory (default: stories260K, converted)")
    p.add_argument("--tokenizer", type=Path, help="its tokenizer (default: stories260K's tok512.model)")
    p.add_argument("--random-model", metavar="PRESET",
                   help="instead of --checkpoint: this model preset with random weights (seed 0), e.g. bench_25m; "
                        "speed does not depend on the weights, and the two backends must still agree")
    p.add_argument("--vocab-size", type=int, help="with --random-model: the vocabulary size (that of --tokenizer)")
    p.add_argument("--label", default="stories260k", help="name in the JSON and its file name")
    p.add_argument("--tasks", default=",".join(SHARED_TASKS))
    p.add_argument("--limit", type=int, default=40, help="documents per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both (1: on a shared machine, spinning OpenMP threads of an oversubscribed "
                        "core distort wall times; the CPU seconds of one thread are the stable measure)")
    p.add_argument("--output", type=Path, help="default benchmarks/results/bench_eval_<label>.json")
    return p.parse_args(argv)


def _checkpoints(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """(native dir, Hugging Face dir, tokenizer), exporting with our converter."""
    from model.checkpoints import load_checkpoint, save_checkpoint

    data = Path(args.data_dir or default_data_dir())
    source = args.checkpoint or data / "checkpoints/stories260K/stories260K.bin"
    tokenizer = args.tokenizer or data / "checkpoints/stories260K/tok512.model"
    if args.random_model:
        cfg, state_dict = _random_model(args.random_model, vocab_size=args.vocab_size)
    else:
        cfg, state_dict = load_checkpoint(source)
    save_checkpoint(state_dict, cfg, work / "native", format="native", overwrite=True)
    save_checkpoint(state_dict, cfg, work / "hf", format="hf", overwrite=True)
    return work / "native", work / "hf", tokenizer


def _random_model(preset: str, *, vocab_size: int | None) -> tuple[Any, dict]:
    """A registered model shape with random weights (seed 0), its vocabulary resized to the tokenizer's."""
    import dataclasses

    import torch

    from model.config import get_config
    from model.llama import Llama

    if vocab_size is None:
        raise SystemExit("bench_eval: --random-model needs --vocab-size (the size of --tokenizer's vocabulary)")
    cfg = dataclasses.replace(get_config(preset), vocab_size=vocab_size).validate()
    torch.manual_seed(0)
    return cfg, Llama(cfg).state_dict()


class ModelClock:
    """Wraps an LM's request methods on the instance, summing the wall and CPU seconds spent inside them."""

    def __init__(self, lm: Any) -> None:
        self.seconds = self.cpu_seconds = 0.0
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, self._timed(getattr(lm, name)))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.cpu_seconds += time.process_time() - cpu

        return run


def _evaluate(lm: Any, clock: ModelClock, names: list[str], manager: Any,
              limit: int) -> tuple[dict, dict[str, float]]:
    """One whole evaluation; seconds: ``wall`` (all of it), ``model`` / ``model_cpu`` (inside the model calls)."""
    from evaluation.cli import evaluate_tasks

    clock.seconds = clock.cpu_seconds = 0.0
    start = time.perf_counter()
    results = evaluate_tasks(lm, names, manager=manager, limit=limit, num_fewshot=None, log_samples=True,
                             bootstrap_iters=0, seed=1234)
    return results, {"wall": time.perf_counter() - start, "model": clock.seconds, "model_cpu": clock.cpu_seconds}


def _check_agreement(ours: dict, ref: dict) -> float:
    from tests.eval_helpers import assert_same_metrics, assert_same_samples, metrics, per_sample

    assert_same_metrics(metrics(ours), metrics(ref), label="bench: ours vs hf")
    return assert_same_samples(per_sample(ours), per_sample(ref), label="bench: ours vs hf")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch

    from evaluation.adapter import LlamaLM
    from evaluation.hf_peer import hf_lm
    from evaluation.results import count_examples
    from evaluation.tasks import check_tasks, parse_task_list, task_manager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    names = parse_task_list(args.tasks)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    native, hf_dir, tokenizer = _checkpoints(args, work)
    manager = task_manager(data_dir=args.data_dir, rendered_dir=work / "tasks")
    check_tasks(names, manager=manager)
    contenders = {"ours": LlamaLM.from_checkpoint(native, tokenizer=tokenizer, batch_size=args.batch_size),
                  "hf": hf_lm(hf_dir, tokenizer=tokenizer, batch_size=args.batch_size)}
    clocks = {name: ModelClock(lm) for name, lm in contenders.items()}
    warm = {name: _evaluate(lm, clocks[name], names, manager, args.limit)[0] for name, lm in contenders.items()}
    worst = _check_agreement(warm["ours"], warm["hf"])
    examples = count_examples(warm["ours"])
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "model": [], "model_cpu": []} for k in contenders}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, lm in contenders.items():
            for key, value in _evaluate(lm, clocks[name], names, manager, args.limit)[1].items():
                times[name][key].append(value)
            loads.append(os.getloadavg()[0])
    med = {key: {k: statistics.median(times[k][key]) for k in contenders} for key in ("wall", "model", "model_cpu")}
    result = {
        "benchmark": "lm_eval_adapter_vs_hf_backend",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, fp32",
        "load_average_1min": {"min": min(loads), "max": max(loads)},
        "torch": torch.__version__, "lm_eval": _version("lm_eval"), "transformers": _version("transformers"),
        "model": args.label, "params": contenders["ours"].runner.config.num_params(),
        "tasks": names, "limit_per_task": args.limit, "examples": examples, "batch_size": args.batch_size,
        "repeats": args.repeats, "largest_loglikelihood_difference": worst,
        "accuracies": {t: {k: v for k, v in r.items() if k.startswith("acc,")}
                       for t, r in warm["ours"]["results"].items()},
        "median_s": med,
        "examples_per_s": {key: {k: examples / v for k, v in m.items()} for key, m in med.items()},
        "speedup": {key: m["hf"] / m["ours"] for key, m in med.items()},
        "goal": ">= 2 (examples/s, ours over hf)",
    }
    out = args.output or ROOT / "benchmarks" / "results" / f"bench_eval_{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _version(module: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
