"""The alignment pipeline on the real HH-RLHF samples at the tiny pretrained scale, recorded as JSON.

    python -m train.quickstart --data ../shared/data --steps 400 --run-dir runs/tiny_real      # the base model
    python benchmarks/rlhf_hh_tiny.py --pretrained runs/tiny_real --work runs/rlhf_hh_tiny \\
        --output benchmarks/results/rlhf_hh_tiny.json

Every step is the project's own command line, in order (a step whose output exists is reused):

1. ``python -m rlhf.sft --config configs/rlhf/sft_hh_tiny.toml``: the HH-RLHF chosen dialogues (helpful-base +
   harmless-base, train side of the hash split), held-out answer-token loss before / after;
2. ``python -m rlhf.reward --config configs/rlhf/rm_{helpfulness,safety}_hh_tiny.toml`` from the SFT model;
3. ``python -m rlhf.evaluate_rm``: both reward models on both held-out test sets (Llama 2's 2x2 table) with the
   length-only baseline;
4. ``python -m rlhf.rejection_sampling`` on held-out prompts of both files, K = 8 at temperature 1.0, scored by
   both reward models (Llama 2's combined score): best-of-8 vs a single sample.

The HH-RLHF *train* splits are not available offline: the public *test* splits are split by the hash of the
prompt (10% held out) and everything is trained on one side and evaluated on the other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], *, log: Path) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ,
                              "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def _hardware() -> dict[str, Any]:
    import torch

    from train.metrics import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": os.environ.get(
        "OMP_NUM_THREADS", "default"), "load_average_at_start": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", required=True, help="quickstart run dir (final_model/, tokenizer/tok8192.model)")
    ap.add_argument("--work", default="runs/rlhf_hh_tiny")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--prompts-per-file", type=int, default=100, help="held-out prompts per file for best-of-K")
    ap.add_argument("--parallel-rms", action="store_true", help="train the two reward models at the same time")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "rlhf_hh_tiny.json"))
    args = ap.parse_args(argv)
    pre, work, data = Path(args.pretrained), Path(args.work), Path(args.data)
    tok = pre / "tokenizer" / "tok8192.model"
    helpful = data / "preferences/hh-rlhf/helpful-base/test.jsonl.gz"
    harmless = data / "preferences/hh-rlhf/harmless-base/test.jsonl.gz"
    work.mkdir(parents=True, exist_ok=True)
    py, seconds = sys.executable, {}
    common = [f"--data.tokenizer={tok}", "--run.resume=auto"]
    if not (work / "sft" / "sft_eval.json").is_file():
        seconds["sft"] = _run([py, "-m", "rlhf.sft", "--config", "configs/rlhf/sft_hh_tiny.toml", *common,
                               f"--sft.init_checkpoint={pre}", f"--run.dir={work / 'sft'}"], log=work / "sft.log")
    rm_cmds = {kind: [py, "-m", "rlhf.reward", "--config", f"configs/rlhf/rm_{kind}_hh_tiny.toml", *common,
                      f"--rm.init_checkpoint={work / 'sft'}", f"--rm.helpful_files={helpful}",
                      f"--rm.safety_files={harmless}", f"--run.dir={work / f'rm_{kind}'}"]
               for kind in ("helpfulness", "safety") if not (work / f"rm_{kind}" / "heldout_eval.json").is_file()}
    if args.parallel_rms and len(rm_cmds) == 2:  # two single-threaded trainings on a 2-core machine
        t0 = time.perf_counter()
        procs = {k: subprocess.Popen(c, cwd=ROOT, stdout=(work / f"rm_{k}.log").open("w"), stderr=subprocess.STDOUT)
                 for k, c in rm_cmds.items()}
        for k, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"rm_{k} failed; see {work / f'rm_{k}.log'}")
        seconds["rm_both_in_parallel"] = time.perf_counter() - t0
    else:
        for kind, cmd in rm_cmds.items():
            seconds[f"rm_{kind}"] = _run(cmd, log=work / f"rm_{kind}.log")
    seconds["evaluate_rm"] = _run([py, "-m", "rlhf.evaluate_rm", "--checkpoint", str(work / "rm_helpfulness"),
                                   str(work / "rm_safety"), "--data", str(helpful), str(harmless), "--out",
                                   str(work / "eval")], log=work / "eval.log")
    seconds["rejection_sampling"] = _run([py, "-m", "rlhf.rejection_sampling", "--policy", str(work / "sft"),
                                          "--reward-model", str(work / "rm_helpfulness"), "--safety-reward-model",
                                          str(work / "rm_safety"), "--prompts", str(helpful), str(harmless),
                                          "--split", "valid", "--max-prompts", str(args.prompts_per_file),
                                          "--k", "8", "--temperature", "1.0", "--max-new-tokens", "64",
                                          "--out", str(work / "rs_heldout")], log=work / "rs.log")
    evaluation = json.loads((work / "eval" / "eval_rm.json").read_text())
    result = {
        "benchmark": "rlhf_hh_tiny", "date": datetime.date.today().isoformat(), "hardware": _hardware(),
        "pretrained": str(pre), "pretrain_quickstart": _maybe_json(pre / "quickstart.json"),
        "sft": _maybe_json(work / "sft" / "sft_eval.json"),
        "sft_data": _maybe_json(work / "sft" / "data_report.json", keys=("summary",)),
        "rm_data": {k: _maybe_json(work / f"rm_{k}" / "data_report.json", keys=("train_mixture", "valid_mixture"))
                    for k in ("helpfulness", "safety")},
        "rm_accuracy_2x2": {m: {s: v["accuracy"] for s, v in per.items() if isinstance(v, dict)}
                            for m, per in evaluation["models"].items()},
        "rm_mean_margin": {m: {s: v["mean_margin"] for s, v in per.items() if isinstance(v, dict)}
                           for m, per in evaluation["models"].items()},
        "length_baseline": evaluation["length_baseline"], "heldout_pairs": evaluation["pairs"],
        "best_of_k": _maybe_json(work / "rs_heldout" / "report.json"),
        "seconds": seconds,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print((work / "eval.log").read_text())
    print(json.dumps({k: result[k] for k in ("sft", "rm_accuracy_2x2", "length_baseline")}, indent=2))
    print(f"wrote {args.output}")
    return 0


def _maybe_json(path: Path, *, keys: tuple[str, ...] = ()) -> Any:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {k: data.get(k) for k in keys} if keys else data


if __name__ == "__main__":
    sys.exit(main())
