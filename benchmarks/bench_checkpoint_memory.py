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
  at another layout (each run continues the previous run's checkpoint), the end-of-run export, and (fresh
  runs) the construction. Goal: largest rank within 1.3x of the smallest, falling with more ranks.
  ``--train-layouts dp2_zero3_fresh --code CHECKOUT`` measures ZeRO-3 construction on another checkout's code.
- ``ppo``: the same for PPO's best-policy export (1, 2, 4 processes).

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
# --code: the checkout whose code the measured processes import (e.g. main before a change), default this one
CODE = Path(os.environ.get("BENCH_CODE_ROOT", str(ROOT)))
sys.path.insert(0, str(CODE))

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


# ---- train: peak RSS per rank of the real training loop (torchrun), per checkpoint phase ------------------
TRAIN_MODEL = ["--model.name=debug_tiny", "--model.overrides.dim=768", "--model.overrides.n_layers=10",
               "--model.overrides.n_heads=12", "--model.overrides.n_kv_heads=12", "--model.overrides.vocab_size=32000",
               "--model.overrides.multiple_of=256", "--model.overrides.max_seq_len=128"]
TRAIN_BASE = [*TRAIN_MODEL, "--data.synthetic=true", "--data.seq_len=64", "--train.global_batch_size=2",
              "--train.micro_batch_size=1", "--train.seed=7", "--train.eval_every=0", "--train.log_every=100",
              "--optim.lr=1e-4", "--optim.warmup_steps=1", "--logging.wandb=false", "--train.preflight=false",
              # the whole save (copy + write) inside the measured call, not in a background thread
              "--checkpoint.async_save=false", "--checkpoint.keep_last=2"]
# (name, processes, layout flags, resume from: the run whose step-2/3 checkpoint this one continues, or None)
TRAIN_LAYOUTS = [
    ("single", 1, [], None),
    ("tp2", 2, ["--parallel.tp=2"], "single"),
    ("dp2_zero1", 2, ["--zero.stage=1"], "tp2"),
    ("dp2_zero3", 2, ["--zero.stage=3"], "dp2_zero1"),
    ("tp2_dp2_zero3", 4, ["--parallel.tp=2", "--zero.stage=3"], "dp2_zero3"),
    ("single_resumed", 1, [], "tp2_dp2_zero3"),
    # not in the default run: ZeRO-3 construction from scratch (``construct``/``build`` of a fresh run), for the
    # before/after comparison of partitioned construction (--train-layouts dp2_zero3_fresh [--code OTHER])
    ("dp2_zero3_fresh", 2, ["--zero.stage=3"], None),
]
DEFAULT_TRAIN_LAYOUTS = [name for name, *_ in TRAIN_LAYOUTS if not name.endswith("_fresh")]
PHASES = ("build", "construct", "resume", "save", "export")


def _hwm_and_rss() -> tuple[int, int]:
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmHWM"], fields["VmRSS"]


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _hwm_and_rss()[1]


def train_worker(out: Path, overrides: list[str]) -> None:
    """Under torchrun: ``train.loop.train`` with the phases wrapped. Each phase resets the peak counter on entry
    and records VmHWM on exit: ``construct`` = ``TrainEngine.__init__`` through the first DeepSpeed engine
    (module, seeded init, ZeRO; fresh runs only), ``resume`` = ``CheckpointManager.load``, ``save`` =
    ``CheckpointManager.save`` (synchronous: copy + write), ``export`` = ``train.task.export_final``."""
    import train.checkpointing as checkpointing
    import train.engine as engine_mod
    import train.task as task_mod
    from train.config import RunConfig
    from train.loop import train

    phases: dict[str, dict] = {}

    def record(name: str, baseline: int) -> None:
        if name not in phases:  # the first of each (the resumed runs save once more at the end)
            peak = _hwm_and_rss()[0]
            phases[name] = {"baseline": baseline, "peak": peak, "growth": peak - baseline}

    def measured(name: str, fn):
        def wrapper(*args, **kwargs):
            baseline = _reset_peak()
            try:
                return fn(*args, **kwargs)
            finally:
                record(name, baseline)
        return wrapper

    state = {"loading": False}
    orig_init, orig_engine = engine_mod.TrainEngine.__init__, engine_mod.TrainEngine._engine

    def init(self, *args, **kwargs):
        self._bench_baseline = _reset_peak()
        orig_init(self, *args, **kwargs)
        record("build", self._bench_baseline)
        # what the parameters hold on this rank once built (ZeRO-3 built partitioned: only its partitions)
        phases["built_param_bytes"] = sum(p.numel() * p.element_size() + (
            p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor") else 0)
            for p in self.module.parameters())

    def build_engine(self):
        fresh = self.ds is None and not state["loading"]
        result = orig_engine(self)
        if fresh:
            record("construct", self._bench_baseline)
        return result

    orig_load = checkpointing.CheckpointManager.load

    def load(self, *args, **kwargs):
        state["loading"] = True
        return measured("resume", orig_load)(self, *args, **kwargs)

    engine_mod.TrainEngine.__init__, engine_mod.TrainEngine._engine = init, build_engine
    checkpointing.CheckpointManager.load = load
    checkpointing.CheckpointManager.save = measured("save", checkpointing.CheckpointManager.save)
    task_mod.export_final = measured("export", task_mod.export_final)
    result = train(RunConfig.from_toml(None, [*TRAIN_BASE, *overrides, f"--run.dir={out}"]),
                   print_fn=lambda *a, **k: None)
    if result.reason != "completed":
        raise SystemExit(f"{out}: {result.reason}")
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rss_rank{rank}.json").write_text(json.dumps(phases))


def _summarise(per_rank: list[dict]) -> dict:
    summary = {}
    for phase in PHASES:
        rows = [r[phase] for r in per_rank if phase in r]
        if not rows:
            continue
        peaks, growths = [r["peak"] for r in rows], [r["growth"] for r in rows]
        summary[phase] = {"peak_mib_per_rank": [p / MiB for p in peaks],
                          "growth_mib_per_rank": [g / MiB for g in growths],
                          "largest_over_smallest_peak": max(peaks) / min(peaks),
                          "largest_over_smallest_growth": max(growths) / max(min(growths), 1)}
    summary["built_param_mib_per_rank"] = [r.get("built_param_bytes", 0) / MiB for r in per_rank]
    return summary


def measure_train(work: Path, root: Path = CODE, only: list[str] | None = None, reuse: bool = False) -> dict:
    """Every layout of ``TRAIN_LAYOUTS`` in its own torchrun launch (``root``: the checkout whose code runs)."""
    from train.config import RunConfig

    cfg = RunConfig.from_toml(None, TRAIN_BASE)
    model_cfg = cfg.model_config()
    results: dict = {"model": dict(cfg.model.overrides), "params": model_cfg.num_params(),
                     "model_fp32_mib": model_cfg.num_params() * 4 / MiB, "code": str(root), "layouts": {}}
    final_step: dict[str, int] = {}  # each run's last step (= its last checkpoint), which the next resumes
    for name, nproc, flags, source in TRAIN_LAYOUTS:
        if source is None:
            final_step[name] = 2
            run_flags = [*flags, "--train.steps=2", "--checkpoint.every=2"]
        else:
            final_step[name] = final_step[source] + 1  # one step more than the checkpoint it continues
            checkpoint = work / "train" / source / "checkpoints" / f"step_{final_step[source]:08d}"
            run_flags = [*flags, f"--train.steps={final_step[name]}", f"--checkpoint.every={final_step[name]}",
                         f"--run.resume={checkpoint}"]
        if name not in (only or DEFAULT_TRAIN_LAYOUTS):
            continue
        out = work / "train" / name
        done = out / "bench_args.json"
        if reuse and done.is_file() and json.loads(done.read_text()) == {"flags": run_flags, "code": str(root)}:
            print(f"{name}: reusing {out}", flush=True)  # --reuse: the same run measured before (same flags, code)
        else:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   str(Path(__file__).resolve()), "--worker", str(out), *run_flags]
            env = {**os.environ, "PYTHONPATH": str(root), "BENCH_CODE_ROOT": str(root), "OMP_NUM_THREADS": "1",
                   "PYTHONWARNINGS": "ignore"}
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            done.write_text(json.dumps({"flags": run_flags, "code": str(root)}))
        per_rank = [json.loads((out / f"rss_rank{r}.json").read_text()) for r in range(nproc)]
        results["layouts"][name] = {"processes": nproc, "flags": flags, "resumed_from": source,
                                    **_summarise(per_rank)}
        print(name, json.dumps(results["layouts"][name]), flush=True)
    return results


# ---- ppo: PPO's best-policy export (PPOTrainer.export("best_policy")), peak RSS per rank ---------------------
PPO_BASE = [*TRAIN_MODEL, "--reward.helpful=target_tokens:40,41,42,43,44,45,46,47", "--reward.safety=avoid_tokens:60,61",
            "--prompts.synthetic_count=16", "--prompts.heldout=4", "--prompts.max_tokens=16",
            "--rollout.max_new_tokens=8", "--rollout.batch_size=8", "--ppo.iterations=1",
            "--ppo.prompts_per_iteration=8", "--train.global_batch_size=8", "--train.micro_batch_size=4",
            "--eval.every=0", "--train.seed=11", "--train.preflight=false"]
PPO_LAYOUTS = [("single", 1, []), ("tp2", 2, ["--parallel.tp=2"]), ("dp2_zero3", 2, ["--zero.stage=3"]),
               ("tp2_dp2_zero3", 4, ["--parallel.tp=2", "--zero.stage=3"])]


def ppo_worker(out: Path, overrides: list[str]) -> None:
    """Under torchrun: a ``PPOTrainer`` (policy, value, reference; seeded init), then the measured
    ``export("best_policy")``: the export PPO makes at every new best held-out reward."""
    from rlhf.ppo.config import PPOConfig
    from rlhf.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(PPOConfig.from_toml(None, [*PPO_BASE, *overrides, f"--run.dir={out}"]),
                         print_fn=lambda *a, **k: None)
    trainer.policy._engine()  # the (lazy) DeepSpeed engine exists before the measurement, as after a PPO step
    baseline = _reset_peak()
    trainer.export("best_policy")
    peak = _hwm_and_rss()[0]
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rss_rank{rank}.json").write_text(json.dumps({"export": {"baseline": baseline, "peak": peak,
                                                                     "growth": peak - baseline}}))


def measure_ppo(work: Path, root: Path = CODE) -> dict:
    from rlhf.ppo.config import PPOConfig

    model_cfg = PPOConfig.from_toml(None, PPO_BASE).model_config()
    results: dict = {"params": model_cfg.num_params(), "model_fp32_mib": model_cfg.num_params() * 4 / MiB,
                     "layouts": {}}
    for name, nproc, flags in PPO_LAYOUTS:
        out = work / "ppo" / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(Path(__file__).resolve()), "--ppo-worker", str(out), *flags]
        env = {**os.environ, "PYTHONPATH": str(root), "BENCH_CODE_ROOT": str(root), "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"ppo {name}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        per_rank = [json.loads((out / f"rss_rank{r}.json").read_text()) for r in range(nproc)]
        summary = _summarise(per_rank)
        summary.pop("built_param_mib_per_rank", None)
        results["layouts"][name] = {"processes": nproc, "flags": flags, **summary}
        print("ppo", name, json.dumps(results["layouts"][name]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        train_worker(Path(sys.argv[2]), sys.argv[3:])
        return 0
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--ppo-worker":
        ppo_worker(Path(sys.argv[2]), sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="consolidate,train,ppo")
    parser.add_argument("--work", default="/tmp/bench_checkpoint_memory")
    parser.add_argument("--reuse", action="store_true", help="train: keep a layout's earlier measurement under "
                        "--work when its flags and code are the same (resume an interrupted benchmark)")
    parser.add_argument("--train-layouts", default="", help="comma list of TRAIN_LAYOUTS names (default: all)")
    parser.add_argument("--code", default="", help="run the measured processes on another checkout's code "
                        "(e.g. main before a change; also set for this process via BENCH_CODE_ROOT)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_checkpoint_memory.json"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    out_path = Path(args.output)
    # Sections run separately land in the same file: keep the others' results (each with its own date, load).
    report: dict = json.loads(out_path.read_text()) if out_path.is_file() else {}
    report.update({"machine": platform.node(), "cpus": os.cpu_count()})
    stamp = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average_start": os.getloadavg()}
    if "consolidate" in sections:
        report["consolidate"] = {**stamp, "runs": measure_consolidate(work), "load_average_end": os.getloadavg()}
    if "train" in sections:
        report["train"] = {**stamp, **measure_train(work, Path(args.code) if args.code else CODE,
                                                    only=[n for n in args.train_layouts.split(",") if n],
                                                    reuse=args.reuse),
                           "load_average_end": os.getloadavg()}
    if "ppo" in sections:
        report["ppo"] = {**stamp, **measure_ppo(work, Path(args.code) if args.code else CODE),
                         "load_average_end": os.getloadavg()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
