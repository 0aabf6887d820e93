"""DPO from an SFT model on the real HH-RLHF samples at the tiny scale: held-out implicit-reward accuracy as JSON.

    python benchmarks/dpo_hh_tiny.py --work runs/dpo_hh_tiny --output benchmarks/results/dpo_hh_tiny.json
    python benchmarks/dpo_hh_tiny.py --sft runs/rlhf_hh_tiny/sft        # reuse an SFT model (rlhf_hh_tiny.py's)

Every step is the project's own command line, in order (a step whose output exists in ``--work`` is reused):

1. (without ``--sft`` / ``--pretrained``) ``python -m train.quickstart --data DATA --minutes M``: a tiny Llama
   (debug_15m, its own 8192-piece tokenizer) pretrained on the real C4 / Wikipedia / Common Crawl samples;
2. (without ``--sft``) ``python -m rlhf.sft --config configs/rlhf/sft_hh_tiny.toml --train.steps 40``: SFT on
   the HH-RLHF chosen dialogues (helpful-base + harmless-base, train side of the hash split), 40 steps of 16
   packed rows (~0.1 epoch: the preset's 2 epochs take ~50 min on 2 cores);
3. ``python -m rlhf.dpo --config configs/rlhf/dpo_tiny.toml --train.steps 60`` from the SFT model on helpful-base
   pairs (60 steps of 16 = 960 of the 2105 training pairs), train side of the same hash split as the reward
   model (``rlhf.sources.load_pairs``: 10% of prompts held out).
   The stage itself writes ``dpo_eval.json``: on the held-out pairs, the share whose implicit reward
   ``beta * (log pi/pi_ref (chosen) - log pi/pi_ref (rejected))`` is > 0, with its standard error
   ``sqrt(p (1 - p) / n)``. Before any step that accuracy is undefined (every margin is 0: policy = reference),
   so the claim checked is "accuracy > 50% by more than one standard error".

The HH-RLHF *train* splits are not available offline: the public *test* splits are split by the hash of the
prompt and everything is trained on one side and evaluated on the other.
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
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def _hardware() -> dict[str, Any]:
    import platform

    import torch

    from train.metrics import cpu_name

    return {"cpu": cpu_name(), "machine": platform.machine(), "cores": os.cpu_count(), "gpu": None,
            "torch": torch.__version__, "threads": os.environ.get("OMP_NUM_THREADS", "default")}


def _tokenizer_of(model_dir: Path) -> Path:
    sidecar = model_dir / "final_model" / "rlhf.json"
    if sidecar.is_file():
        return Path(json.loads(sidecar.read_text())["tokenizer"])
    return model_dir / "tokenizer" / "tok8192.model"


def main(argv: list[str] | None = None) -> int:  # long: one linear recipe of three commands
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/dpo_hh_tiny")
    ap.add_argument("--data", default=os.environ.get("LLAMA_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--sft", default="", help="an SFT run dir to start DPO from (skips steps 1-2)")
    ap.add_argument("--pretrained", default="", help="a quickstart run dir to start SFT from (skips step 1)")
    ap.add_argument("--pretrain-minutes", type=float, default=4.0)
    ap.add_argument("--sft-steps", type=int, default=40, help="SFT steps of 16 rows (0 = the preset's 2 epochs)")
    ap.add_argument("--dpo-steps", type=int, default=60,
                    help="DPO steps of 16 pairs (0 = one epoch: 132 steps)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dpo_hh_tiny.json"))
    args = ap.parse_args(argv)
    work, data = Path(args.work), Path(args.data)
    helpful = data / "preferences/hh-rlhf/helpful-base/test.jsonl.gz"
    if not helpful.is_file():
        raise SystemExit(f"{helpful} not found: set --data or LLAMA_DATA_DIR to the shared data directory")
    work.mkdir(parents=True, exist_ok=True)
    py, seconds, commands = sys.executable, {}, []
    t_start, load_start = time.perf_counter(), os.getloadavg()

    def step(name: str, cmd: list[str]) -> None:
        commands.append(" ".join(cmd))
        seconds[name] = round(_run(cmd, log=work / f"{name}.log"), 1)

    sft = Path(args.sft) if args.sft else work / "sft"
    if not args.sft:
        pre = Path(args.pretrained) if args.pretrained else work / "pretrained"
        if not args.pretrained and not (pre / "final_model").is_dir():
            step("pretrain", [py, "-m", "train.quickstart", "--data", str(data), "--minutes",
                              str(args.pretrain_minutes), "--run-dir", str(pre)])
        if not (sft / "sft_eval.json").is_file():
            step("sft", [py, "-m", "rlhf.sft", "--config", "configs/rlhf/sft_hh_tiny.toml",
                         f"--data.tokenizer={_tokenizer_of(pre)}", f"--sft.init_checkpoint={pre}",
                         f"--train.steps={args.sft_steps}", "--run.resume=auto", f"--run.dir={sft}"])
    dpo = work / "dpo"
    if not (dpo / "dpo_eval.json").is_file():
        step("dpo", [py, "-m", "rlhf.dpo", "--config", "configs/rlhf/dpo_tiny.toml",
                     f"--data.tokenizer={_tokenizer_of(sft)}", f"--dpo.init_checkpoint={sft}",
                     f"--dpo.files={helpful}", f"--train.steps={args.dpo_steps}", "--run.resume=auto",
                     f"--run.dir={dpo}"])
    evaluation = json.loads((dpo / "dpo_eval.json").read_text())
    metrics = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m.get("type", m.get("kind", "train")) == "train" and "dpo/loss" in m]
    acc, se = evaluation["accuracy"], evaluation["accuracy_stderr"]
    result = {
        "benchmark": "dpo_hh_tiny", "date": datetime.date.today().isoformat(), "hardware": _hardware(),
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
        "sft": str(sft), "sft_eval": _maybe_json(sft / "sft_eval.json"),
        "dpo_data": _maybe_json(dpo / "data_report.json", keys=("summary",)),
        "dpo_settings": {"config": "configs/rlhf/dpo_tiny.toml", "steps": args.dpo_steps or "one epoch"},
        "heldout": evaluation,
        "accuracy_above_half_by_stderrs": (acc - 0.5) / se if se > 0 else None,
        "goal_met": bool(acc - 0.5 > se),
        "train_first_last": {k: [train[0].get(k), train[-1].get(k)] for k in
                             ("step", "loss", "dpo/reward_accuracy", "dpo/reward_margin")} if train else None,
        "seconds": seconds, "seconds_total_this_invocation": round(time.perf_counter() - t_start, 1),
        "commands": commands,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("heldout", "accuracy_above_half_by_stderrs", "goal_met", "seconds")},
                     indent=2))
    print(f"wrote {args.output}")
    return 0 if result["goal_met"] else 1


def _maybe_json(path: Path, *, keys: tuple[str, ...] = ()) -> Any:
    if not path.is_file():
        return None
    obj = json.loads(path.read_text())
    return {k: obj.get(k) for k in keys} if keys else obj


if __name__ == "__main__":
    sys.exit(main())
