"""Command line of the launch package: plan a layout, write an sbatch script, print a node's torchrun command.

    python -m launch plan --model llama3_1_405b --gpus 16384 --gpu h100-sxm --seq-len 8192 \
        --global-batch-tokens 16777216 [--tp 8 --pp 16 --zero-stage 1 --micro-batch 1] [--json]
    python -m launch plan --stage ppo --model llama2_70b --gpus 64 --gpu-memory 80GiB [--tp 8 --zero-stage 3]
    python -m launch devices [--match "NVIDIA A100-SXM4-80GB"] [--json]
    python -m launch slurm --config CONFIG --nodes N --gpus-per-node G [--partition P --time T --submit]
    python -m launch torchrun --config CONFIG --nodes N --node-rank R --master ADDR:PORT [--run]

Exit codes: 0 success, 2 bad input (unknown model, impossible layout; the message says what to change),
1 nothing fits / submission failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

from launch import checkpoint_plan, cpu_plan, cpu_ppo_plan, planner, slurm, stage_plan, torchrun
from model.config import get_config, model_flops_per_token
from train import devices

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '85899345920' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 80GiB or 80GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory / FLOPs / step time of a layout, or the best layouts that fit")
    p.add_argument("--model", required=True, help="registered config name (model/config.py)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu", default="h100-sxm", type=_device_key,
                   help="device whose datasheet figures (bf16 peak, memory, HBM and NVLink bandwidth) the plan "
                        "uses: a key of `python -m launch devices` or a name as CUDA reports it (default h100-sxm)")
    p.add_argument("--gpu-memory", type=parse_bytes, help="override the device's memory (e.g. 80GiB)")
    p.add_argument("--gpus-per-node", type=int, default=planner.Hardware.gpus_per_node)
    p.add_argument("--seq-len", type=int, help="sequence length (required for pretraining; --stage: 4096)")
    p.add_argument("--global-batch-tokens", type=int,
                   help="tokens per optimizer step (required for pretraining; --stage: 64 sequences)")
    p.add_argument("--stage", choices=stage_plan.STAGES,
                   help="an alignment stage: memory by role (policy, value, reference, reward models, rollout "
                        "copy, KV cache) and by phase (launch/stage_plan.py); default: pretraining")
    p.add_argument("--rollout-batch", type=int, default=stage_plan.StageShape.rollout_batch,
                   help="--stage ppo: prompts per generate() call per rank (the KV cache's batch)")
    p.add_argument("--reward-models", type=int, default=stage_plan.StageShape.reward_models,
                   help="--stage ppo: reward models held in memory (Llama 2: 2)")
    p.add_argument("--frozen-zero-stage", type=int, choices=(1, 2, 3),
                   help="--stage ppo: ZeRO stage of the reference and reward models (default: 3 on GPUs, "
                        "--zero-stage with --device cpu, as ppo.frozen_zero_stage=-1)")
    p.add_argument("--offload-frozen", action="store_true",
                   help="--stage ppo: the frozen roles' ZeRO-3 partitions in host memory (ppo.offload_frozen)")
    p.add_argument("--tp", type=int)
    p.add_argument("--cp", type=int, help="context-parallel ranks per sequence (2 x CP chunks, Llama 3)")
    p.add_argument("--pp", type=int)
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="plan Megatron sequence parallelism at TP > 1 (default on, like train/'s "
                        "--parallel.sequence_parallel; every TP > 1 plan prints both figures)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="force full recomputation on/off (default: the least recomputation that fits)")
    p.add_argument("--virtual-stages", type=int, help="pin interleaved chunks per stage")
    p.add_argument("--max-virtual-stages", type=int, default=1,
                   help="search interleaved 1F1B up to this many chunks (DeepSpeed runs 1; Megatron/Meta more)")
    p.add_argument("--lora-rank", type=int, default=0, help="plan LoRA fine-tuning: adapters of this rank, base frozen")
    p.add_argument("--lora-targets", default="q,k,v,o", help="LoRA projections (q,k,v,o,gate,up,down)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--all-variants", action="store_true", help="do not collapse variants of one TPxPPxDP")
    p.add_argument("--peak-tflops", type=float,
                   help="override the device's dense bf16 peak that MFU is measured against")
    p.add_argument("--matmul-efficiency", type=float, default=planner.Hardware.matmul_efficiency)
    p.add_argument("--ib-gbps", type=float, default=planner.Hardware.ib_gbps)
    p.add_argument("--nvlink-gbps", type=float, help="override the device's intra-node per-direction GB/s")
    p.add_argument("--reserved", type=parse_bytes, default=planner.Hardware.reserved_bytes,
                   help="fixed CUDA context / NCCL / fragmentation allowance per GPU")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: host memory of one fp32 CPU process (--gpus = processes; launch/cpu_plan.py)")
    p.add_argument("--runtime-overhead", type=parse_bytes,
                   help="cpu: the runtime's fixed resident memory (default: measured now, ~10 s)")
    p.add_argument("--storage-node-gbps", type=float, default=checkpoint_plan.Storage.node_write_gbps,
                   help="checkpoint write bandwidth of one node to the filesystem, GB/s")
    p.add_argument("--storage-aggregate-gbps", type=float, default=checkpoint_plan.Storage.aggregate_gbps,
                   help="checkpoint filesystem bandwidth for all nodes together, GB/s")
    p.add_argument("--host-copy-gbps", type=float, default=checkpoint_plan.Storage.host_copy_gbps,
                   help="device-to-host copy bandwidth per GPU (the checkpoint stall), GB/s")
    p.add_argument("--json", action="store_true", help="print the machine-readable plan")


def _gib(value: float) -> str:
    return f"{value / planner.GiB:7.2f} GiB"


def _print_plan(cfg, plan: planner.Plan, args, hw: planner.Hardware) -> None:
    mem, st = plan.memory, plan.step
    flops = model_flops_per_token(cfg, args.seq_len) * args.global_batch_tokens
    print(f"{cfg.name}: {plan.layout.describe()} on {plan.layout.gpus} GPUs, {plan.microbatches} micro-batches")
    print(f"per-GPU memory, worst pipeline stage {mem.stage} (1F1B in flight: {mem.in_flight_microbatches}):")
    rows = [("weights (bf16)", mem.weights), ("grads (bf16)", mem.grads),
            ("optimizer (fp32 master+m+v)", mem.optimizer_states), ("fp32 grad partition", mem.fp32_grads),
            ("ZeRO-3 gathered layer", mem.zero3_gathered), ("activations", mem.activations),
            ("logits + loss", mem.logits), ("comm buffers", mem.comm_buffers),
            ("CUDA ctx/NCCL/fragmentation", mem.reserved), ("total", mem.total)]
    for name, value in rows:
        print(f"  {name:<30}{_gib(value)}")
    print(f"  fits in {hw.memory_bytes / planner.GiB:.0f} GiB: {'yes' if plan.fits else 'NO'}")
    print(f"model FLOPs/step {flops:.3e} (6N + 6*head + 12*L*d*s/2, causal); step {st.step_s:.2f} s "
          f"(compute {st.compute_s:.2f}, TP {st.tp_comm_s:.2f}, CP {st.cp_comm_s:.2f}, p2p {st.pp_p2p_s:.2f}, bubble {st.bubble_s:.2f}, "
          f"DP exposed {st.dp_exposed_s:.2f}, optimizer {st.optimizer_s:.3f}); MFU {st.mfu:.1%}")
    for note in plan.notes:
        print(f"  - {note}")
    print(f"  - {checkpoint_plan.checkpoint_cost(cfg, plan.layout, storage=_storage(args, hw)).describe()}")


def _storage(args: argparse.Namespace, hw: planner.Hardware) -> checkpoint_plan.Storage:
    return checkpoint_plan.Storage(node_write_gbps=args.storage_node_gbps, aggregate_gbps=args.storage_aggregate_gbps,
                                   host_copy_gbps=args.host_copy_gbps, gpus_per_node=hw.gpus_per_node)


def _plan_json(cfg, plan: planner.Plan, args: argparse.Namespace, hw: planner.Hardware) -> dict:
    return {**plan.to_dict(),
            "checkpoint": checkpoint_plan.checkpoint_cost(cfg, plan.layout, storage=_storage(args, hw)).to_dict()}


def _print_table(cfg, plans: list[planner.Plan], hw: planner.Hardware, storage: checkpoint_plan.Storage) -> None:
    print(f"hardware model: {hw.name} {hw.peak_tflops:.0f} TFLOP/s bf16 x {hw.matmul_efficiency:.0%} matmul "
          f"efficiency, +{hw.nonmatmul_overhead:.0%} non-matmul time, NVLink {hw.nvlink_gbps:.0f} GB/s, "
          f"IB {hw.ib_gbps:.0f} GB/s per GPU, {hw.gpus_per_node} GPUs/node, "
          f"{hw.reserved_bytes / planner.GiB:.0f} GiB reserved")
    print(f"checkpoint storage model: {storage.node_write_gbps:g} GB/s per node, {storage.aggregate_gbps:g} GB/s "
          f"filesystem, {storage.host_copy_gbps:g} GB/s device->host per GPU (--storage-node-gbps, "
          "--storage-aggregate-gbps, --host-copy-gbps)")
    print(f"{'#':>2} {'layout':<62} {'mem GiB':>8} {'step s':>7} {'bubble':>7} {'MFU':>6} "
          f"{'ckpt GB/rank':>12} {'ckpt GB':>8} {'stall s':>7} {'write s':>7} {'runs':>5}")
    for i, plan in enumerate(plans, 1):
        cost = checkpoint_plan.checkpoint_cost(cfg, plan.layout, storage=storage)
        print(f"{i:>2} {plan.layout.describe():<62} {plan.memory.total / planner.GiB:8.1f} "
              f"{plan.step.step_s:7.2f} {plan.step.bubble_fraction:7.0%} {plan.step.mfu:6.1%} "
              f"{cost.bytes_per_rank_max / 1e9:12.2f} {cost.total_bytes / 1e9:8.0f} {cost.stall_s:7.2f} "
              f"{cost.write_s:7.1f} {'yes' if plan.runnable else 'NO':>5}")
    if any(not plan.runnable for plan in plans):
        print("runs = NO: the engine in train/ cannot run that layout yet; the notes below say why")
    best = plans[0]
    for i, plan in enumerate(plans, 1):
        print(f"#{i} {plan.layout.describe()}:")
        for note in plan.notes:
            print(f"    {note}")
        if i > 1:
            print(f"    vs #1: {why_slower(plan, best)}")
    print(f"#1 ranks first because it has the lowest estimated step time: {why_slower(best, None)}")


def why_slower(plan: planner.Plan, best: planner.Plan | None) -> str:
    """The step-time components in which ``plan`` loses to ``best`` (or its own largest costs)."""
    parts = {"compute+recompute": plan.step.compute_s, "TP comm": plan.step.tp_comm_s,
             "CP K/V comm": plan.step.cp_comm_s,
             "pipeline bubble": plan.step.bubble_s, "exposed DP comm": plan.step.dp_exposed_s,
             "p2p": plan.step.pp_p2p_s}
    if best is None:
        return ", ".join(f"{k} {v:.2f} s" for k, v in parts.items() if v > 0.005)
    ref = {"compute+recompute": best.step.compute_s, "TP comm": best.step.tp_comm_s,
           "CP K/V comm": best.step.cp_comm_s,
           "pipeline bubble": best.step.bubble_s, "exposed DP comm": best.step.dp_exposed_s,
           "p2p": best.step.pp_p2p_s}
    worse = sorted(((parts[k] - ref[k], k) for k in parts if parts[k] - ref[k] > 0.005), reverse=True)
    extra = plan.step.step_s - best.step.step_s
    return f"+{extra:.2f} s/step: " + (", ".join(f"{k} +{d:.2f} s" for d, k in worse) or "rounding")


def cmd_plan_cpu(args: argparse.Namespace) -> int:
    """``plan --device cpu``: the peak resident memory of each CPU training process, item by item."""
    cfg = get_config(args.model)
    if (args.tp or 1) != 1 or (args.pp or 1) != 1 or args.activation_checkpointing:
        raise ValueError("--device cpu plans --tp 1 --pp 1 without activation checkpointing (what the CPU "
                         "engine runs here); drop --tp/--pp/--activation-checkpointing")
    mb, zero = args.micro_batch or 1, 1 if args.zero_stage is None else args.zero_stage
    seqs, rest = divmod(args.global_batch_tokens, args.seq_len)
    if rest or seqs % (args.gpus * mb):
        raise ValueError(f"--global-batch-tokens {args.global_batch_tokens} must be a multiple of --seq-len "
                         f"{args.seq_len} x --gpus {args.gpus} x --micro-batch {mb}")
    measured = args.runtime_overhead is None
    overhead = cpu_plan.measure_runtime_overhead(zero_stage=zero) if measured else args.runtime_overhead
    plan = cpu_plan.plan_cpu_process(cfg, seq_len=args.seq_len, micro_batch=mb, grad_accum=seqs // (args.gpus * mb),
                                     zero_stage=zero, dp=args.gpus, runtime_overhead=overhead)
    if args.json:
        print(json.dumps({"model": cfg.name, "device": "cpu", "plan": plan.to_dict()}, indent=2))
        return 0
    print(f"{cfg.name} on CPU: {args.gpus} process(es), ZeRO-{zero}, micro-batch {mb} x {args.seq_len}, "
          f"{seqs // (args.gpus * mb)} micro-batch(es)/step, fp32; peak in the {plan.phase}")
    for name, value in plan.rows():
        print(f"  {name:<34}{value / 2**20:9.0f} MiB")
    source = ("measured now: python+torch+deepspeed+megatron runtime after 2 steps of debug_tiny" if measured
              else "given with --runtime-overhead")
    print(f"  runtime overhead {source}; the rest is live tensors (RSS equals them with "
          "MALLOC_MMAP_THRESHOLD_=131072, see launch/cpu_plan.py)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if args.stage == "ppo" and args.device == "cpu":
        return cpu_ppo_plan.cmd_plan_cpu_ppo(args)
    if args.stage and args.device == "cpu":
        raise ValueError(f"--stage {args.stage} with --device cpu is not planned yet (--stage ppo is); leave out "
                         "--device cpu")
    if not args.stage and (args.seq_len is None or args.global_batch_tokens is None):
        raise ValueError("pretraining plans need --seq-len and --global-batch-tokens (or give --stage)")
    if args.device == "cpu":
        return cmd_plan_cpu(args)
    cfg = get_config(args.model)
    hw = planner.hardware_for(args.gpu, memory_bytes=args.gpu_memory, gpus_per_node=args.gpus_per_node,
                              peak_tflops=args.peak_tflops, matmul_efficiency=args.matmul_efficiency,
                              ib_gbps=args.ib_gbps, nvlink_gbps=args.nvlink_gbps, reserved_bytes=args.reserved)
    if args.stage:
        return stage_plan.cmd_plan_stage(args, hw)
    kw = dict(seq_len=args.seq_len, global_batch_tokens=args.global_batch_tokens, hardware=hw)
    pinned = {k: getattr(args, k) for k in ("tp", "cp", "pp", "zero_stage", "micro_batch", "virtual_stages",
                                            "activation_checkpointing", "sequence_parallel")
              if getattr(args, k) is not None}
    if args.global_batch_tokens % args.seq_len:
        raise ValueError(f"--global-batch-tokens {args.global_batch_tokens} is not a multiple of --seq-len "
                         f"{args.seq_len}")
    if all(k in pinned for k in ("tp", "pp", "zero_stage", "micro_batch")):
        cp = args.cp or 1
        if args.gpus % (args.tp * cp * args.pp):
            raise ValueError(f"--gpus {args.gpus} is not divisible by --tp {args.tp} x --cp {cp} x --pp {args.pp}")
        layout = planner.Layout(tp=args.tp, cp=cp, pp=args.pp, dp=args.gpus // (args.tp * cp * args.pp),
                                zero_stage=args.zero_stage, micro_batch=args.micro_batch,
                                virtual_stages=args.virtual_stages or 1,
                                sequence_parallel=args.sequence_parallel is not False, lora_rank=args.lora_rank,
                                lora_targets=args.lora_targets)
        plan = planner.fit_checkpointing(cfg, layout, buffers=planner.ZeroBuffers(),
                                         checkpointing=args.activation_checkpointing, **kw)
        if args.json:
            print(json.dumps({"model": cfg.name, "hardware": dataclasses.asdict(hw),
                              "plan": _plan_json(cfg, plan, args, hw),
                              "model_flops_per_token": model_flops_per_token(cfg, args.seq_len)},
                             indent=2))
        else:
            _print_plan(cfg, plan, args, hw)
        return 0 if plan.fits else 1
    plans = planner.search(cfg, gpus=args.gpus, fixed=pinned, max_virtual_stages=args.max_virtual_stages,
                           top_k=args.top_k, distinct=not args.all_variants, **kw)
    if args.json:
        print(json.dumps({"model": cfg.name, "hardware": dataclasses.asdict(hw),
                          "model_flops_per_token": model_flops_per_token(cfg, args.seq_len),
                          "plans": [_plan_json(cfg, p, args, hw) for p in plans]}, indent=2))
    elif plans:
        _print_table(cfg, plans, hw, _storage(args, hw))
    if not plans:
        print(f"no layout of {cfg.name} fits {args.gpus} GPUs of {hw.memory_bytes / planner.GiB:.0f} GiB with "
              f"{pinned or 'no pinned flags'}; add GPUs, shorten --seq-len or unpin flags", file=sys.stderr)
        return 1
    return 0


def _device_key(text: str) -> str:
    try:
        return devices.device_spec(text).key
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _devices_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("devices", help="the datasheet table MFU and the planner use (dense peaks per precision)")
    p.add_argument("--match", help="show the row a reported device name (torch.cuda.get_device_name()) matches")
    p.add_argument("--json", action="store_true")


def cmd_devices(args: argparse.Namespace) -> int:
    rows = list(devices.DEVICES.values())
    if args.match is not None:
        spec = devices.match_device(args.match)
        if spec is None:
            print(f"{args.match!r} matches no row of train/devices.py; pass the peak explicitly "
                  "(--peak-tflops / logging.peak_tflops)", file=sys.stderr)
            return 1
        rows = [spec]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    print("dense peaks in TFLOP/s (no 2:4 sparsity); memory GB; bandwidths GB/s (link: per direction, in a node)")
    print(f"{'key':<15}{'device':<32}{'bf16':>8}{'fp8':>8}{'tf32':>8}{'fp32':>7}{'GB':>6}{'HBM':>7}{'link':>6}")
    for r in rows:
        fp8 = f"{r.fp8_tflops:8.0f}" if r.fp8_tflops else f"{'-':>8}"
        print(f"{r.key:<15}{r.label:<32}{r.bf16_tflops:8.0f}{fp8}{r.tf32_tflops:8.0f}{r.fp32_tflops:7.1f}"
              f"{r.memory_gb:6.0f}{r.hbm_gbps:7.0f}{r.link_gbps:6.0f}")
    return 0


def _slurm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="write (and --submit) the sbatch script")
    p.add_argument("--config", required=True, help="training config passed to `-m MODULE --config`")
    p.add_argument("--module", default="train",
                   help="program to run: train (default) or a stage that checkpoints and resumes, e.g. rlhf.ppo")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 = CPU-only job")
    p.add_argument("--nproc-per-node", type=int, help="processes per node (default: gpus-per-node, or 1)")
    p.add_argument("--job-name", default="llama")
    p.add_argument("--partition")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--signal-lead", type=int, default=300, help="seconds before the limit to checkpoint")
    p.add_argument("--log-root", default="logs")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH line, e.g. --constraint=h100")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE exported in the script")
    p.add_argument("--no-resume", action="store_true", help="do not pass --resume auto")
    p.add_argument("--output", help="script path (default LOG_ROOT/JOB_NAME.sbatch)")
    p.add_argument("--submit", action="store_true")
    p.add_argument("overrides", nargs="*", help="--section.key=value passed to train (after `--`)")


def cmd_slurm(args: argparse.Namespace) -> int:
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env {item!r} must be KEY=VALUE")
        env[key] = value
    job = slurm.SlurmJob(
        config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
        job_name=args.job_name, partition=args.partition, time=args.time, account=args.account, qos=args.qos,
        cpus_per_task=args.cpus_per_task, mem=args.mem, exclusive=args.exclusive, signal_lead_s=args.signal_lead,
        log_root=args.log_root, overrides=list(args.overrides), resume=None if args.no_resume else "auto",
        extra_sbatch=args.sbatch_arg, env=env, module=args.module)
    path = slurm.write_sbatch(job, args.output)
    print(f"wrote {path}")
    if args.submit:
        try:
            print(f"submitted job {slurm.submit(path)}")
        except (RuntimeError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


def _torchrun_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("torchrun", help="print (or --run) this node's torchrun command")
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, help="default: from SLURM / OpenMPI, else 1")
    p.add_argument("--node-rank", type=int, help="default: from SLURM / OpenMPI; rank 0 hosts the rendezvous")
    p.add_argument("--master", help="HOST:PORT of node 0 (default: MASTER_ADDR/PORT or the SLURM node list)")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--rdzv", choices=torchrun.RENDEZVOUS, default="c10d",
                   help="c10d (default; store on node 0), static (fixed node order) or standalone (one node)")
    p.add_argument("--rdzv-id", help="rendezvous id, the same on every node (default: SLURM_JOB_ID or llama)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart all workers this often after a failure (they resume: --resume auto)")
    p.add_argument("--shutdown-timeout", type=int, default=240, help="seconds workers get to checkpoint")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--run", action="store_true", help="exec the command instead of printing it")
    p.add_argument("overrides", nargs="*", help="--section.key=value passed to train (after `--`)")


def cmd_torchrun(args: argparse.Namespace) -> int:
    cmd = torchrun.node_command(config=args.config, nproc_per_node=args.nproc_per_node, nodes=args.nodes,
                                node_rank=args.node_rank, master=args.master, overrides=args.overrides,
                                resume=None if args.no_resume else "auto", shutdown_timeout=args.shutdown_timeout,
                                rdzv=args.rdzv, rdzv_id=args.rdzv_id, max_restarts=args.max_restarts)
    env = torchrun.command_env(max_restarts=args.max_restarts)
    if args.run:
        print(f"[launch] {torchrun.format_command(cmd, env)}", flush=True)
        os.environ.update(env)
        argv = torchrun.executable_command(cmd)
        os.execv(argv[0], argv)
    print(torchrun.format_command(cmd, env))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _plan_parser(sub)
    _devices_parser(sub)
    _slurm_parser(sub)
    _torchrun_parser(sub)
    args = parser.parse_args(argv)
    handler = {"plan": cmd_plan, "devices": cmd_devices, "slurm": cmd_slurm,
               "torchrun": cmd_torchrun}[args.command]
    try:
        return handler(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
