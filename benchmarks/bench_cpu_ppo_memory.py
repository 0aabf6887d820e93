"""The CPU PPO memory plan against measured peak RSS, per rank and per phase, at DP2 x ZeRO-3 and TP2 (issue 16).

    python benchmarks/bench_cpu_ppo_memory.py [--output benchmarks/results/cpu_ppo_memory.json]   # ~3 min

The same runs as ``tests/e2e/test_cpu_ppo_memory_plan.py`` (bench_25m policy, value model and frozen reference,
2 PPO iterations under ``launch/ppo_rss.py``, ``MALLOC_MMAP_THRESHOLD_=131072``), one after the other, with the
overhead probe first; writes every phase's plan and measurement per rank, and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.cpu_ppo_plan import measure_ppo_runtime_overhead, model_bytes  # noqa: E402
from tests.e2e.launch_helpers import train_env  # noqa: E402
from tests.e2e.test_cpu_ppo_memory_plan import LAYOUTS, PHASES, _argv, _plan  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "cpu_ppo_memory.json"))
    args = parser.parse_args()
    env = train_env(MALLOC_MMAP_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    load = [os.getloadavg()]
    overhead = measure_ppo_runtime_overhead(env=env, timeout_s=900)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cpu_ppo_memory_") as tmp:
        for name, (tp, _, zero) in LAYOUTS.items():
            out = Path(tmp) / name
            out.mkdir()
            subprocess.run(_argv(out, tp, zero), cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
            plan = _plan(name, overhead)
            ranks = []
            for r in (0, 1):
                rank = json.loads((out / "rss" / f"rank{r}.json").read_text())
                last = dict(rank["history"])
                last.update(checkpoint=rank["phases"]["checkpoint"], export=rank["phases"]["export"])
                ranks.append({"rank": r, "peak": rank["peak"], "peak_error": rank["peak"] / plan.peak - 1,
                              "phases": {p: {"plan": plan.phase_total(p), "measured": last[p],
                                             "error": last[p] / plan.phase_total(p) - 1} for p in PHASES}})
            results[name] = {"tp": tp, "dp": LAYOUTS[name][1], "zero_stage": zero, "plan": plan.to_dict(),
                             "plan_peak": plan.peak, "plan_peak_phase": plan.peak_phase,
                             "model_bytes": model_bytes(plan), "ranks": ranks}
            load.append(os.getloadavg())
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU", "load_average": load,
              "runtime_overhead": overhead, "layouts": results}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    for name, res in results.items():
        for rank in res["ranks"]:
            phases = ", ".join(f"{p} {v['measured'] / 2**20:.0f}/{v['plan'] / 2**20:.0f} ({v['error']:+.1%})"
                               for p, v in rank["phases"].items())
            print(f"{name} rank {rank['rank']}: peak {rank['peak'] / 2**20:.0f} MiB vs plan "
                  f"{res['plan_peak'] / 2**20:.0f} MiB ({rank['peak_error']:+.1%}); measured/plan MiB: {phases}")
    print(f"runtime overhead {overhead / 2**20:.0f} MiB; load {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
