"""Benchmark: PPO rollout tokens/s under ZeRO-3, weights gathered once per rollout vs gathered per token.

    python benchmarks/bench_rollout.py [--nproc 2] [--model debug_15m] [--output benchmarks/results/bench_rollout.json]

The script relaunches itself under ``torchrun --nproc-per-node N`` (data parallel N, ZeRO-3: every rank holds
1/N of each weight). Each rank samples ``--batch`` prompts x ``--new-tokens`` tokens with the PPO policy engine
(``rlhf/ppo/rollout.py``) in the two modes, alternating ABAB... ``--repeats`` times after a warm-up, in the same run:

- ``once`` (Llama 2, sec. 3.2.3 systems note): one all-gather of every partition, a plain copy of the network
  generates with no communication, freed after;
- ``per_token`` (the peers' default): every forward runs through the DeepSpeed engine, which all-gathers each
  layer's partitions at every generated token and frees them again.

Both modes must produce the same tokens (checked). Reported: median tokens/s of the whole data-parallel group
per mode and the speedup ``once / per_token`` (goal >= 5x), as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="data-parallel processes (ZeRO-3 partitions)")
    p.add_argument("--model", default="debug_15m", help="model registry name")
    p.add_argument("--batch", type=int, default=8, help="prompts per rank per rollout")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_rollout.json"))
    return p.parse_args(argv)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(Path(__file__).resolve()), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def _worker(args: argparse.Namespace) -> None:
    import torch

    from model import comm
    from rlhf.ppo.config import PPOConfig
    from rlhf.ppo.prompts import shard, synthetic_prompts
    from rlhf.ppo.roles import PolicyObjective
    from rlhf.ppo.rollout import answer_seed, rollout
    from train.engine import TrainEngine
    from train.topology import Topology

    topo = Topology.initialize(tp=1)
    cfg = PPOConfig.from_toml(None, [f"--model.name={args.model}", "--zero.stage=3",
                                     f"--train.global_batch_size={args.nproc}", "--train.micro_batch_size=1",
                                     "--reward.helpful=constant:0.5"])
    model_cfg = cfg.model_config()
    engine = TrainEngine(model_cfg=model_cfg, engine_cfg=cfg.engine_config(role="policy"), topology=topo,
                         objective=PolicyObjective())
    prompts = synthetic_prompts(n=args.batch * topo.world_size, vocab_size=model_cfg.vocab_size,
                                min_len=args.prompt_len, max_len=args.prompt_len, seed=0)
    local = shard(prompts, dp_rank=topo.dp_rank, dp_size=topo.dp_size)
    seeds = [answer_seed(0, 0, p.index) for p in local]

    def run(mode: str) -> tuple[list[list[int]], float]:
        comm.barrier()
        t0 = time.perf_counter()
        samples, _ = rollout(engine, local, seeds=seeds, mode=mode, max_new_tokens=args.new_tokens,
                             temperature=1.0, top_p=1.0, stop_ids=(model_cfg.vocab_size + 1,), pad_id=0,
                             batch_size=args.batch)
        comm.barrier()
        return [s.answer for s in samples], time.perf_counter() - t0

    outputs = {mode: run(mode)[0] for mode in ("once", "per_token")}  # warm-up, and the equality check
    times: dict[str, list[float]] = {"once": [], "per_token": []}
    for _ in range(args.repeats):
        for mode in times:
            times[mode].append(run(mode)[1])
    same = not comm.any_rank(outputs["once"] != outputs["per_token"])
    tokens = args.batch * args.new_tokens * topo.world_size
    if topo.global_rank == 0:
        rate = {m: tokens / statistics.median(t) for m, t in times.items()}
        result = {
            "benchmark": "rollout_zero3_gathered_vs_per_token",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, {topo.world_size} processes "
                        f"x {torch.get_num_threads()} threads, gloo",
            "load_average": os.getloadavg()[0], "torch": torch.__version__, "model": args.model, "params": model_cfg.num_params(),
            "zero_stage": 3, "data_parallel": topo.world_size, "batch_per_rank": args.batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "outputs_identical": same,
            "median_s": {m: statistics.median(t) for m, t in times.items()},
            "tokens_per_s": rate, "speedup_once_over_per_token": rate["once"] / rate["per_token"],
            "goal": ">= 5",
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if "WORLD_SIZE" not in os.environ:
        return _launch(args, argv)
    warnings.filterwarnings("ignore")
    _worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
