"""Experiment: PPO runs through ``python -m rlhf.ppo``, their curves summarised as JSON.

    python benchmarks/ppo_runs.py tiny --work runs/ppo_exp [--output benchmarks/results/ppo_tiny.json]
    python benchmarks/ppo_runs.py hh --work runs/ppo_exp --sft runs/rlhf_hh_tiny/sft \\
        --rm-helpful runs/rlhf_hh_tiny/rm_helpfulness --rm-safety runs/rlhf_hh_tiny/rm_safety \\
        --tokenizer runs/tiny_real/tokenizer/tok8192.model [--output benchmarks/results/ppo_hh_tiny.json]

``tiny``: ``configs/rlhf/ppo_tiny.toml`` (seeded debug_tiny, synthetic prompts, programmatic helpfulness and
safety rewards, a quarter of the prompts safety-flagged). ``hh``: ``configs/rlhf/ppo_hh_tiny.toml``: the SFT
policy and the two reward models of ``benchmarks/rlhf_hh_tiny.py`` (issue "Alignment I") on the HH-RLHF
prompts (harmless-base prompts safety-flagged, held-out prompts from the reward models' held-out side).
Extra ``--`` arguments are passed to ``rlhf.ppo``. The JSON holds the per-iteration curves (batch and
held-out rewards, KL, entropy, clip fraction, value loss, length, seconds) and the first/best/last held-out
reward; ``python -m train.report`` plots the run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CURVES = ("reward/helpful", "reward/safety", "reward/combined", "reward/logit_combined", "reward/used_safety",
          "kl", "kl_k3", "entropy", "clip_fraction", "value_loss", "response_length", "gen_time_s",
          "train_time_s", "heldout/reward/logit_combined", "heldout/reward/combined", "heldout/reward/helpful",
          "heldout/reward/safety", "heldout/reward/safety_on_safety_prompts", "heldout/kl")


def summarise(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curves = {k: [[r["step"], r[k]] for r in records if isinstance(r.get(k), (int, float))] for k in CURVES}
    held = curves["heldout/reward/logit_combined"]
    best = max(held, key=lambda p: p[1]) if held else None
    return {"iterations": max(r["step"] for r in records), "curves": curves,
            "heldout_logit_combined": {"first": held[0] if held else None, "best": best,
                                       "last": held[-1] if held else None},
            "alarms": [a for r in records for a in r.get("alarms", [])],
            "skipped": sum(1 for r in records if r.get("skipped"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=("tiny", "hh"))
    p.add_argument("--work", default="runs/ppo_exp")
    p.add_argument("--sft", default="")
    p.add_argument("--rm-helpful", default="")
    p.add_argument("--rm-safety", default="")
    p.add_argument("--tokenizer", default="")
    p.add_argument("--output", default="")
    args, extra = p.parse_known_args(argv)
    run_dir = Path(args.work).resolve() / args.which
    cmd = [sys.executable, "-m", "rlhf.ppo", "--config", f"configs/rlhf/ppo_{args.which}{'_tiny' * (args.which == 'hh')}.toml",
           f"--run.dir={run_dir}", *[x for x in extra if x != "--"]]
    if args.which == "hh":
        if not (args.sft and args.rm_helpful and args.rm_safety and args.tokenizer):
            p.error("hh needs --sft, --rm-helpful, --rm-safety and --tokenizer")
        cmd += [f"--ppo.init={args.sft}", f"--reward.helpful={args.rm_helpful}",
                f"--reward.safety={args.rm_safety}", f"--data.tokenizer={args.tokenizer}"]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return proc.returncode
    subprocess.run([sys.executable, "-m", "train.report", str(run_dir)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    result = {"experiment": f"ppo_{args.which}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, load average at the end "
                          f"{os.getloadavg()[0]:.1f}", "command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - t0,
              **summarise(run_dir)}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
