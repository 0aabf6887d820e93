"""Per-GPU memory of the alignment stages (SFT, reward model, DPO, PPO) by role and by phase, on the
pretraining planner's memory model (``launch/planner.py``: one model of memory, not a second copy).

    python -m launch plan --stage ppo --model llama2_70b --gpus 64 --gpu-memory 80GiB      # ranked layouts
    python -m launch plan --stage ppo --model llama2_70b --gpus 64 --tp 4 --zero-stage 3   # one: refused?
    python -m launch plan --stage sft --model llama2_7b --gpus 8 --seq-len 4096

    from launch.stage_plan import StageShape, plan_stage, search_stage
    plan = plan_stage("ppo", cfg, Layout(tp=8, dp=8, zero_stage=3, activation_checkpointing=True),
                      shape=StageShape(seq_len=4096))
    plan.peak_phase, plan.peak, plan.fits

What each role holds, from ``planner.model_state_bytes`` / ``plan_memory`` (bf16 weights, fp32 master + Adam
moments, ZeRO partitioning over DP, TP slicing):

* a trained role (SFT/RM/DPO model; PPO policy and value model): weights + optimizer states all the time; its
  gradients, fp32 gradient partition, ZeRO-3 gathered module, activations (``activation_bytes_per_token``),
  logits and communication buckets only while it trains. The value / reward models have no LM head.
* a frozen role (PPO reference and reward models): an inference-only engine (``TrainEngine(inference_only=
  True)``): bf16 weights only, partitioned over DP under ZeRO-3 (``ppo.frozen_zero_stage``), else the TP shard;
  no optimizer, fp32 master or gradients.
* the rollout copy (PPO under ZeRO-3, ``rollout.gather=once``): this rank's TP shard of the policy in bf16,
  built in its dtype and filled one gathered block at a time (``rlhf/ppo/rollout.py``): 2 B/param / TP plus
  one block; without ZeRO-3 the training module generates itself (no copy). KV cache: rollout batch x
  sequence x layers x 2 (K, V) x KV heads x head dim / TP x 2 B.

Phases (PPO): rollout (copy + KV cache) -> scoring (forwards of policy, reference, value and reward models,
no graph kept: one block's working set and the logits of a micro-batch) -> training (policy, then value; the
larger counts). SFT / RM: training; DPO: reference scoring (kept on disk), then training on chosen + rejected.
Every phase also holds every role's resident part and the fixed ``Hardware.reserved_bytes``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sys
from dataclasses import dataclass, field

from launch import planner
from launch.planner import BF16, FP32, Hardware, Layout, ZeroBuffers
from model.config import LlamaConfig

STAGES = ("sft", "rm", "dpo", "ppo")
DEFAULT_HARDWARE, DEFAULT_BUFFERS = Hardware(), ZeroBuffers()


@dataclass(frozen=True)
class StageShape:
    """The sizes a stage's memory depends on beyond the layout."""

    seq_len: int = 4096
    """Longest sequence: SFT/RM/DPO samples; PPO prompt + answer (what the KV cache and scoring hold)."""
    rollout_batch: int = 8
    """PPO: prompts per generate() call on one rank (``rollout.batch_size``): the KV cache's batch."""
    reward_models: int = 2
    """PPO: reward models held as frozen roles (Llama 2: helpfulness and safety; 0 = programmatic)."""
    frozen_zero_stage: int = 3
    """PPO: ZeRO stage of the frozen roles (``ppo.frozen_zero_stage``)."""
    offload_frozen: bool = False
    """PPO: the frozen roles' ZeRO-3 partitions in host memory (``ppo.offload_frozen``): no device memory outside
    the scoring phase's gathered module."""
    global_batch: int = 64
    """Sequences per optimizer step (PPO: rollouts per minibatch, Llama 2: 64); ranks layouts by step time."""


@dataclass
class StagePlan:
    """Bytes per GPU: ``resident[role][item]`` held in every phase, ``phases[phase][item]`` on top of it."""

    stage: str
    layout: Layout
    resident: dict[str, dict[str, float]]
    phases: dict[str, dict[str, float]]
    reserved: float
    memory_bytes: int
    step_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def resident_total(self) -> float:
        return sum(sum(items.values()) for items in self.resident.values())

    def phase_total(self, phase: str) -> float:
        return self.resident_total + sum(self.phases[phase].values()) + self.reserved

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> float:
        return self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak <= self.memory_bytes

    def to_dict(self) -> dict[str, object]:
        return {"stage": self.stage, "layout": dataclasses.asdict(self.layout), "resident": self.resident,
                "phases": self.phases, "phase_totals": {p: self.phase_total(p) for p in self.phases},
                "reserved": self.reserved, "peak_phase": self.peak_phase, "peak": self.peak, "fits": self.fits,
                "memory_bytes": self.memory_bytes, "step_s": self.step_s, "notes": self.notes}


def _head_params(cfg: LlamaConfig, layout: Layout) -> float:
    return 0.0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim / layout.tp


def trained_role(cfg: LlamaConfig, layout: Layout, *, seq_len: int, lm_head: bool = True, pairs: int = 1,
                 buffers: ZeroBuffers = DEFAULT_BUFFERS) -> tuple[dict[str, float], dict[str, float]]:
    """``(resident, while training)`` bytes of one trained engine, from the pretraining planner's breakdown.
    ``lm_head=False``: a scalar-head model (value / reward model); ``pairs=2``: DPO's chosen + rejected."""
    mem = planner.plan_memory(cfg, dataclasses.replace(layout, micro_batch=layout.micro_batch * pairs),
                              seq_len=seq_len, microbatches=1, buffers=buffers, hardware=Hardware(reserved_bytes=0))
    p = planner.stage_params(cfg, layout, 0)
    keep = 1.0 if lm_head else (p - _head_params(cfg, layout)) / p  # the value model has no vocab head
    logits = mem.logits if lm_head else BF16 * cfg.dim * layout.micro_batch * pairs * seq_len
    resident = {"weights": keep * mem.weights, "optimizer states": keep * mem.optimizer_states}
    training = {"grads": keep * mem.grads, "fp32 grads": keep * mem.fp32_grads,
                "ZeRO-3 gathered": mem.zero3_gathered, "activations": mem.activations, "logits": logits,
                "comm buffers": mem.comm_buffers}
    return resident, training


def frozen_role(cfg: LlamaConfig, layout: Layout, *, zero_stage: int, lm_head: bool = True,
                offload: bool = False) -> dict[str, float]:
    """An inference-only engine: bf16 weights of this rank's TP shard, partitioned over DP under ZeRO-3;
    ``offload``: those partitions in host memory (gathered per module while scoring: ``scoring_bytes``)."""
    p = planner.stage_params(cfg, layout, 0) - (0.0 if lm_head else _head_params(cfg, layout))
    return {"weights": 0.0 if offload else BF16 * p / (layout.shard_ranks if zero_stage == 3 else 1)}


def scoring_bytes(cfg: LlamaConfig, layout: Layout, *, seq_len: int, zero_stage: int) -> dict[str, float]:
    """One no-grad forward of a micro-batch: one block's working set, the logits, a ZeRO-3 gathered module."""
    tokens = layout.micro_batch * seq_len
    block = planner.activation_bytes_per_token(cfg, layout, seq_len) * tokens
    logits = (BF16 + FP32) * cfg.vocab_size / layout.tp * tokens
    gathered = 2 * BF16 * planner.largest_module_params(cfg, layout.tp) if zero_stage == 3 else 0.0
    return {"forward working set": block, "logits": logits, "ZeRO-3 gathered": gathered}


def rollout_bytes(cfg: LlamaConfig, layout: Layout, shape: StageShape) -> dict[str, float]:
    """The generation copy (ZeRO-3 only; this rank's TP shard, bf16), one gathered block, the KV cache."""
    copy = BF16 * planner.stage_params(cfg, layout, 0) if layout.zero_stage == 3 else 0.0
    sharded, replicated = planner.block_params(cfg, layout.tp)
    gathering = BF16 * max(sharded + replicated, cfg.vocab_size * cfg.dim / layout.tp) if copy else 0.0
    kv = BF16 * 2 * cfg.kv_heads * cfg.head_dim / layout.tp * cfg.n_layers * shape.rollout_batch * shape.seq_len
    last_logits = FP32 * cfg.vocab_size * shape.rollout_batch  # the gathered full-vocabulary logits per step
    return {"rollout copy": copy, "one gathered block": gathering, "KV cache": kv, "logits": last_logits}


def _add(*parts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def plan_stage(stage: str, cfg: LlamaConfig, layout: Layout, *, shape: StageShape = StageShape(),
               hardware: Hardware = DEFAULT_HARDWARE) -> StagePlan:
    """Per-role, per-phase memory of ``stage`` at ``layout`` (see the module docstring)."""
    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: use one of {', '.join(STAGES)} (or leave it out for pretraining)")
    s = shape.seq_len
    # The engine runs sequence parallelism for SFT, the reward model, DPO and PPO's trained roles (and their LoRA
    # forms; train.parallelize.sequence_parallel_obstacle); on pipeline stages only SFT and DPO: counted off there.
    if stage in ("rm", "ppo") and layout.pp > 1:
        layout = dataclasses.replace(layout, sequence_parallel=False)
    plan = StagePlan(stage=stage, layout=layout, resident={}, phases={}, reserved=hardware.reserved_bytes,
                     memory_bytes=hardware.memory_bytes)
    if stage in ("sft", "rm", "dpo"):
        pairs = 2 if stage in ("rm", "dpo") else 1  # RM and DPO read chosen + rejected together
        resident, training = trained_role(cfg, layout, seq_len=s, lm_head=stage != "rm", pairs=pairs)
        plan.resident["policy" if stage == "dpo" else "model"] = resident
        if stage == "dpo":
            plan.phases["reference scoring"] = scoring_bytes(cfg, layout, seq_len=s, zero_stage=layout.zero_stage)
        plan.phases["training"] = training
        return plan
    if shape.offload_frozen and shape.frozen_zero_stage != 3:
        raise ValueError(f"--offload-frozen needs the frozen roles at ZeRO-3 (--frozen-zero-stage 3), not "
                         f"{shape.frozen_zero_stage}: their partitions are what is held in host memory")
    policy, policy_training = trained_role(cfg, layout, seq_len=s)
    value, value_training = trained_role(cfg, layout, seq_len=s, lm_head=False)
    frozen = functools.partial(frozen_role, cfg, layout, zero_stage=shape.frozen_zero_stage,
                               offload=shape.offload_frozen)
    plan.resident = {"policy": policy, "value": value, "reference": frozen()}
    for i in range(shape.reward_models):
        name = ("helpfulness RM", "safety RM")[i] if i < 2 else f"reward model {i + 1}"
        plan.resident[name] = frozen(lm_head=False)
    if shape.offload_frozen:
        host = sum(frozen_role(cfg, layout, zero_stage=3, lm_head=i == 0)["weights"]
                   for i in range(1 + shape.reward_models))
        plan.notes.append(f"frozen roles in host memory: {host / planner.GiB:.1f} GiB of CPU RAM per rank, "
                          "one module gathered to the GPU at a time while scoring")
    plan.phases["rollout"] = rollout_bytes(cfg, layout, shape)
    plan.phases["scoring"] = scoring_bytes(cfg, layout, seq_len=s,
                                           zero_stage=max(layout.zero_stage, shape.frozen_zero_stage))
    larger = max(policy_training, value_training, key=lambda d: sum(d.values()))
    plan.phases["training"] = larger
    if layout.zero_stage == 3:
        plan.notes.append("rollout copy: this rank's 1/TP shard of the policy in bf16, filled block by block")
    return plan


def _step_time(cfg: LlamaConfig, layout: Layout, shape: StageShape, hardware: Hardware) -> float:
    tokens = shape.global_batch * shape.seq_len
    try:
        return planner.estimate_step(cfg, layout, seq_len=shape.seq_len, global_batch_tokens=tokens,
                                     hardware=hardware).step_s
    except ValueError:  # the global batch does not split over this DP x micro-batch
        return float("inf")


PIPELINE_STAGES = ("sft", "dpo")
"""The alignment stages whose objectives run on pipeline stages (``Objective.supports_pipeline``: SFT's language
model, DPO); the reward model and PPO's roles refuse ``parallel.pp > 1``."""


def stage_layouts(cfg: LlamaConfig, *, gpus: int, hardware: Hardware, fixed: dict[str, object]) -> list[Layout]:
    """TP (within a node, dividing the heads) x PP x DP = gpus, ZeRO 1-3 (ZeRO-1 under PP: DeepSpeed's pipeline
    engine runs no other), checkpointing on/off. PP only when pinned (``--pp``, SFT and DPO): the search
    otherwise stays with TP x DP, which the alignment stages' sizes fit."""
    out = []
    pp = int(fixed.get("pp", 1))
    tps = [t for t in (1, 2, 4, 8, 16, 32) if t <= hardware.gpus_per_node and gpus % (t * pp) == 0
           and cfg.n_heads % t == 0 and cfg.kv_heads % t == 0]
    for tp, zero, ckpt in itertools.product(tps, (1, 2, 3) if pp == 1 else (1,), (False, True)):
        layout = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), zero_stage=zero,
                        micro_batch=int(fixed.get("micro_batch", 1)), activation_checkpointing=ckpt)
        if all(getattr(layout, k) == v for k, v in fixed.items()):
            out.append(layout)
    return out


def search_stage(stage: str, cfg: LlamaConfig, *, gpus: int, shape: StageShape = StageShape(),
                 hardware: Hardware = DEFAULT_HARDWARE, fixed: dict[str, object] | None = None) -> list[StagePlan]:
    """Every candidate layout's plan: those that fit first, by the policy's estimated training step time
    (``planner.estimate_step``), then those that do not, by peak memory."""
    plans = []
    for layout in stage_layouts(cfg, gpus=gpus, hardware=hardware, fixed=fixed or {}):
        plan = plan_stage(stage, cfg, layout, shape=shape, hardware=hardware)
        plan.step_s = _step_time(cfg, layout, shape, hardware)
        plans.append(plan)
    return sorted(plans, key=lambda p: (not p.fits, p.step_s if p.fits else p.peak, p.peak))


def describe(plan: StagePlan) -> list[str]:
    """The plan as ``python -m launch plan --stage`` prints it: every role, every phase, the peak."""
    gib = planner.GiB
    lines = [f"{plan.stage} on {plan.layout.describe()} ({plan.layout.gpus} GPUs): peak {plan.peak / gib:.1f} GiB "
             f"in the {plan.peak_phase} phase; fits {plan.memory_bytes / gib:.0f} GiB: "
             f"{'yes' if plan.fits else 'NO'}",
             "  resident in every phase, by role:"]
    for role, items in plan.resident.items():
        detail = ", ".join(f"{k} {v / gib:.2f}" for k, v in items.items())
        lines.append(f"    {role:<16}{sum(items.values()) / gib:8.2f} GiB  ({detail})")
    lines.append(f"    {'reserved':<16}{plan.reserved / gib:8.2f} GiB  (CUDA context, NCCL, fragmentation)")
    lines.append("  each phase on top of that:")
    for phase, items in plan.phases.items():
        detail = ", ".join(f"{k} {v / gib:.2f}" for k, v in items.items() if v)
        lines.append(f"    {phase:<16}{sum(items.values()) / gib:8.2f} GiB -> total {plan.phase_total(phase) / gib:6.1f}"
                     f" GiB  ({detail})")
    if not plan.fits:
        over = plan.peak - plan.memory_bytes
        lines.append(f"  REFUSED: the {plan.peak_phase} phase needs {plan.peak / gib:.1f} GiB, {over / gib:.1f} GiB more "
                     f"than the {plan.memory_bytes / gib:.0f} GiB per GPU; raise --tp, use --zero-stage 3, "
                     "activation checkpointing, a smaller --rollout-batch or more GPUs")
    lines += [f"  - {note}" for note in plan.notes]
    return lines


def cmd_plan_stage(args: object, hardware: Hardware) -> int:
    """``python -m launch plan --stage STAGE``: one pinned layout (refused with the numbers when it does not fit)
    or the ranked layouts that fit."""
    from model.config import get_config

    cfg = get_config(args.model)
    shape = StageShape(seq_len=args.seq_len or StageShape.seq_len, rollout_batch=args.rollout_batch,
                       reward_models=args.reward_models,
                       frozen_zero_stage=args.frozen_zero_stage or StageShape.frozen_zero_stage,
                       offload_frozen=bool(getattr(args, "offload_frozen", False)),
                       global_batch=(args.global_batch_tokens // (args.seq_len or StageShape.seq_len)
                                     if args.global_batch_tokens else StageShape.global_batch))
    if (args.pp or 1) != 1 and args.stage not in PIPELINE_STAGES:
        raise ValueError(f"--pp {args.pp}: the {args.stage} stage does not run under pipeline parallelism (only "
                         f"{' and '.join(PIPELINE_STAGES)} do); use --tp and ZeRO")
    if (args.pp or 1) != 1 and (args.zero_stage or 1) != 1:
        raise ValueError(f"--pp {args.pp} with --zero-stage {args.zero_stage}: DeepSpeed's pipeline engine runs "
                         "ZeRO-1 only; use --zero-stage 1 (or leave it out)")
    fixed = {k: getattr(args, k) for k in ("tp", "pp", "zero_stage", "micro_batch", "activation_checkpointing")
             if getattr(args, k) is not None}
    plans = search_stage(args.stage, cfg, gpus=args.gpus, shape=shape, hardware=hardware, fixed=fixed)
    if not plans:
        raise ValueError(f"no layout of {args.gpus} GPUs matches {fixed}: --gpus must be a multiple of --tp x --pp")
    fitting = [p for p in plans if p.fits]
    shown = plans[:1] if len(plans) == 1 else fitting[: args.top_k] or plans[:1]
    if args.json:
        print(json.dumps({"model": cfg.name, "stage": args.stage, "shape": dataclasses.asdict(shape),
                          "plans": [p.to_dict() for p in shown]}, indent=2))
    else:
        print(f"{cfg.name}, {args.stage}: sequences of {shape.seq_len} tokens"
              + (f", rollout batch {shape.rollout_batch} per rank, {shape.reward_models} reward model(s), frozen "
                 f"roles at ZeRO-{shape.frozen_zero_stage}{' in host memory' if shape.offload_frozen else ''}"
                 if args.stage == "ppo" else "")
              + f"; {len(fitting)} of {len(plans)} layouts fit, ranked by the estimated training step time")
        for i, plan in enumerate(shown, 1):
            print(f"#{i} " + "\n".join(describe(plan)))
    if not fitting:
        print(f"no layout of {cfg.name} ({args.stage}) fits {args.gpus} GPUs of "
              f"{hardware.memory_bytes / planner.GiB:.0f} GiB{' with ' + str(fixed) if fixed else ''}",
              file=sys.stderr)
        return 1
    return 0
