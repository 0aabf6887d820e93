"""Benchmark: peak resident memory of checkpoint I/O, per process, at model sizes >= 100M parameters.

    python benchmarks/bench_checkpoint_memory.py [--sections consolidate,train,ppo] [--work /tmp/ckpt_mem]
        [--output benchmarks/results/bench_checkpoint_memory.json]

Every measurement runs in a fresh process that imports everything first, then resets its peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), records its resident memory as the baseline, does the one thing
measured, and reports ``VmHWM`` (peak resident set) from ``/proc/self/status``. Reported: the growth over the
baseline, next to the size of the largest tensor and of the whole model (fp32).

Sections:
- ``consolidate``: ``train.consolidate`` of a TP2 x DP2 portable checkpoint to sharded Hugging Face
  safetensors, for a ~140M and a ~300M model with the same largest tensor (the embedding). Goal: growth
  <= ~2 largest tensors and about the same for both sizes (streaming), not proportional to the model.
- ``train``: a ~110M model trained for 2 steps under ``torchrun`` at 1, 2 and 4 processes (1 process;
  TP2; DP2 ZeRO-1; DP2 ZeRO-3; TP2 x DP2 ZeRO-3), peak RSS per rank during: the checkpoint save, the resume
  at another layout, the end-of-run export. Goal: largest rank within 1.3x of the smallest, falling with
  more ranks.
- ``ppo``: the same for PPO's best-policy export.

Heavy on a shared 2-core machine (minutes, several GB on disk under ``--work``): run it when the machine is
quiet; the load average goes into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1024**2
# Reset the peak counter after the imports, so the baseline is the interpreter with torch & co loaded.
MEASURE_PRELUDE = textwrap.dedent("""
    import json, sys
    def _status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    def _reset_peak():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status("VmRSS:")
""")


def _consolidate_config(n_layers: int) -> dict:
    """Same embedding (the largest tensor: 32000 x 1024 fp32 = 131 MB) at every depth."""
    return {"name": f"bench_ckpt_{n_layers}l", "dim": 1024, "n_layers": n_layers, "n_heads": 16, "vocab_size": 32000,
            "multiple_of": 256, "max_seq_len": 256}


def measure_consolidate(work: Path) -> list[dict]:
    from model.config import LlamaConfig
    from tests.checkpoint_helpers import random_state_dict, write_portable_checkpoint

    results = []
    for n_layers in (6, 18):
        cfg = LlamaConfig(**_consolidate_config(n_layers)).validate()
        run = work / f"consolidate_{n_layers}l"
        shutil.rmtree(run, ignore_errors=True)
        state = random_state_dict(cfg, seed=n_layers)
        largest = max(t.numel() * 4 for t in state.values())
        total = sum(t.numel() * 4 for t in state.values())
        write_portable_checkpoint(run, state, cfg, tp=2, dp=2, step=1)
        del state
        code = MEASURE_PRELUDE + textwrap.dedent(f"""
            from train.consolidate import consolidate
            base = _reset_peak()
            consolidate({str(run)!r}, {str(run / 'hf')!r}, format="hf", max_shard_bytes="1GB")
            print(json.dumps({{"baseline": base, "peak": _status("VmHWM:")}}))
        """)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        rss = json.loads(proc.stdout.strip().splitlines()[-1])
        growth = rss["peak"] - rss["baseline"]
        results.append({"n_layers": n_layers, "params": cfg.num_params(), "model_fp32_mib": total / MiB,
                        "largest_tensor_mib": largest / MiB, "baseline_mib": rss["baseline"] / MiB,
                        "peak_mib": rss["peak"] / MiB, "growth_mib": growth / MiB,
                        "growth_in_largest_tensors": growth / largest})
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(run, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="consolidate")
    parser.add_argument("--work", default="/tmp/bench_checkpoint_memory")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_checkpoint_memory.json"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
                    "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    if "consolidate" in sections:
        report["consolidate"] = measure_consolidate(work)
    report["load_average_end"] = os.getloadavg()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
