"""Host-memory plan of one CPU PPO process (fp32), by role and by phase, at any TP x DP layout with the trained
roles at ZeRO-1 or ZeRO-3 and the frozen roles at ZeRO-1 (a plain TP-sharded module) or ZeRO-3.

    from launch.cpu_ppo_plan import PPOShape, plan_cpu_ppo, measure_ppo_runtime_overhead
    plan = plan_cpu_ppo(get_config("bench_25m"), tp=1, dp=2, zero_stage=3, shape=PPOShape(...),
                        runtime_overhead=measure_ppo_runtime_overhead())
    plan.peak, plan.peak_phase, plan.phase_total("training")     # a launch.stage_plan.StagePlan
    python -m launch plan --stage ppo --device cpu --model bench_25m --gpus 2 --zero-stage 3 --seq-len 24 \
        --micro-batch 4 --global-batch-tokens 192 --rollout-batch 4 --reward-models 0   # --gpus = processes

It is the GPU stage planner's accounting (``launch/stage_plan.py``: every role's resident part, then what each
phase adds) with what the CPU engine really allocates, read off DeepSpeed 0.19.8 and ``train/``, ``rlhf/ppo/``
and checked buffer by buffer with a tensor census and ``launch/ppo_rss.py`` (P = a role's parameters on this
TP rank (``planner.stage_params``; the value model has no vocabulary head), F = 4 bytes):

* trained role (policy, value), ZeRO-1: DeepSpeed's flat weights F P, fp32 master partition F P/dp (cloned even
  from fp32 weights), Adam m + v 2F P/dp. ZeRO-3 (``stage3.py``): the weight partition, fp32 master partition,
  fp32 gradient partition buffer (``grad_partitions_flat_buffer``) and Adam m + v, 5F P/dp, plus the
  contiguous-gradient bucket (``reduce_bucket_size`` 5e7 elements allocated, min(P, 5e7) of it touched by the
  first backward: resident from then on);
* frozen role (reference, reward models; inference-only engines): F P, or F P/dp under ZeRO-3 (its partition);
* rollout: under ZeRO-3 with ``rollout.gather=once`` the plain generation copy F P and one gathered block
  (``rlhf/ppo/rollout.py``); CPU decode packs a second copy of every linear weight for oneDNN
  (``model/prepack.py``: TP 1, fp32, plain linears, <= 2 GiB); the KV cache; the last logits;
* scoring (no-grad forwards of one micro-batch by every role): the logits and log-softmax, one block's
  working set, and under ZeRO-3 the gathered network twice over: DeepSpeed's coalesced all-gather output plus
  each parameter's own ``torch.cat`` of the partitions (``AllGatherCoalescedHandle.wait``), for up to the
  prefetch bucket (5e7 elements) plus the largest module at once;
* training (policy, then value: the larger counts): ZeRO-1: max(backward: accumulated gradients F P when a
  minibatch has several micro-batches, activations (``cpu_plan.activation_bytes_per_token``; at TP 1 the
  fused q/k/v and gate/up weight copies), logits gradients; optimizer step: gradients F P + the flat fp32
  gradient partition F P/dp (the fused AdamW adds no temporaries)). ZeRO-3: the gathered network twice over
  (as in scoring) + activations + logits gradients;
* checkpoint (every ``checkpoint.every`` and at the end): each trained role's shard staged in host memory
  (fp32 master + m + v, 3F P/dp, ``TrainEngine.stage_save``);
* export (``final_policy``, ``final_value``, ``best_policy``): the role's fp32 weight fragments staged (F P/dp,
  ``EngineCheckpoint.exported``) and one whole tensor streamed by rank 0; at the end of a run with
  asynchronous checkpoint writes the last checkpoint's staged copies are still held (it is published after
  the exports);
* the runtime overhead (python, torch, DeepSpeed, megatron-core, rlhf/, gloo): measured by running the same
  PPO code on ``debug_tiny`` (``measure_ppo_runtime_overhead``), minus that model's own plan.

Live bytes, as in ``launch/cpu_plan.py``: RSS follows them with ``MALLOC_MMAP_THRESHOLD_=131072``. Not modelled:
bf16 on CPU, ZeRO-2, pipeline parallelism, offload, an asynchronous checkpoint write still running when the next
iteration peaks (the staged copies then add to that phase), the held-out evaluation (a rollout and a scoring of
the held-out prompts: no more than the training rollout's at the same batch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launch import cpu_plan, planner
from launch.planner import Layout
from launch.stage_plan import StagePlan
from model.config import LlamaConfig

F = 4  # fp32 bytes
REDUCE_BUCKET = 5e7  # train/parallelize.py: reduce_bucket_size, stage3_prefetch_bucket_size (elements)
PREFETCH_BUCKET = 5e7
PACKED_MAX_BYTES = 2 * 2**30  # model/prepack.py MAX_PACKED_BYTES
PROBE_MODEL = "debug_tiny"


@dataclass(frozen=True)
class PPOShape:
    """The sizes of one PPO process's batches (per rank)."""

    seq_len: int
    """Longest prompt + answer (``prompts.max_tokens + rollout.max_new_tokens``)."""
    micro_batch: int
    """Sequences per forward (``train.micro_batch_size``)."""
    local_minibatch: int
    """Rollouts per optimizer step on this rank (``train.global_batch_size / dp``)."""
    rollout_batch: int
    """Prompts per ``generate()`` call (min(``rollout.batch_size``, this rank's prompts))."""
    reward_models: int = 0
    """Reward models held as frozen engines of the policy's shape (0: programmatic rewards)."""


def _params(cfg: LlamaConfig, tp: int, *, lm_head: bool = True) -> float:
    """Parameters of one role on one TP rank; a scalar-head role has no vocabulary head (its head: dim + 1)."""
    p = planner.stage_params(cfg, Layout(tp=tp), 0)
    if lm_head:
        return p
    return p - (0.0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim / tp) + cfg.dim + 1


def _zero3_gathered(cfg: LlamaConfig, tp: int, p: float) -> float:
    """Bytes a ZeRO-3 forward holds gathered at its peak: the flat all-gather output + the parameters' copies."""
    return 2 * F * min(p, PREFETCH_BUCKET + planner.largest_module_params(cfg, tp))


def _trained_resident(p: float, *, dp: int, zero_stage: int) -> dict[str, float]:
    if zero_stage == 3:
        return {"weight partition": F * p / dp, "fp32 master partition": F * p / dp,
                "fp32 gradient partition": F * p / dp, "Adam m + v": 2 * F * p / dp,
                "gradient bucket (touched)": F * min(p, REDUCE_BUCKET)}
    return {"weights": F * p, "fp32 master partition": F * p / dp, "Adam m + v": 2 * F * p / dp}


def _training(cfg: LlamaConfig, p: float, *, tp: int, dp: int, zero_stage: int, shape: PPOShape,
              lm_head: bool) -> dict[str, float]:
    """What one trained role's update adds to the resident bytes, at its peak."""
    tokens = shape.micro_batch * shape.seq_len
    activations = cpu_plan.activation_bytes_per_token(cfg, shape.seq_len, fused=None if tp == 1 else False) * tokens / tp
    logits_grads = 2 * F * tokens * cfg.vocab_size / tp if lm_head else 0.0
    if zero_stage == 3:
        return {"ZeRO-3 gathered (x2)": _zero3_gathered(cfg, tp, p), "activations": activations,
                "logits grads": logits_grads}
    copies = cpu_plan.fused_weight_copy_bytes(cfg) if tp == 1 else 0.0
    accumulated = F * p if shape.local_minibatch > shape.micro_batch else 0.0
    backward = {"gradients (accumulated)": accumulated, "activations": activations,
                "fused weight copies": copies, "logits grads": logits_grads}
    step = {"gradients": F * p, "flat fp32 grad partition": F * p / dp}
    return backward if sum(backward.values()) >= sum(step.values()) else step


def _rollout(cfg: LlamaConfig, p: float, *, tp: int, zero_stage: int, gather: str,
             shape: PPOShape) -> dict[str, float]:
    copy = zero_stage == 3 and gather == "once"
    sharded, replicated = planner.block_params(cfg, tp)
    linears = cfg.n_layers * sharded + cfg.vocab_size * cfg.dim  # what model/prepack.py packs (TP 1 only)
    plain = tp == 1 and (zero_stage < 3 or copy)  # ZeRO-3 partitions and megatron TP layers are not packed
    kv = F * 2 * cfg.kv_heads * cfg.head_dim / tp * cfg.n_layers * shape.rollout_batch * shape.seq_len
    return {"rollout copy": F * p if copy else 0.0,
            "one gathered block": 2 * F * max(sharded + replicated, cfg.vocab_size * cfg.dim / tp) if copy else 0.0,
            "ZeRO-3 gathered (x2)": _zero3_gathered(cfg, tp, p) if zero_stage == 3 and not copy else 0.0,
            "packed decode weights": F * linears if plain and F * linears <= PACKED_MAX_BYTES else 0.0,
            "KV cache": kv, "logits": 2 * F * cfg.vocab_size * shape.rollout_batch}


def _scoring(cfg: LlamaConfig, p: float, *, tp: int, zero_stage: int, frozen_zero_stage: int,
             shape: PPOShape) -> dict[str, float]:
    tokens = shape.micro_batch * shape.seq_len
    block = cpu_plan.activation_bytes_per_token(cfg, shape.seq_len) * tokens / cfg.n_layers / tp
    gathered = _zero3_gathered(cfg, tp, p) if max(zero_stage, frozen_zero_stage) == 3 else 0.0
    return {"ZeRO-3 gathered (x2)": gathered, "logits + log-softmax": 2 * F * tokens * cfg.vocab_size / tp,
            "one block's working set": block}


def plan_cpu_ppo(cfg: LlamaConfig, *, tp: int, dp: int, zero_stage: int, shape: PPOShape,
                 runtime_overhead: float, frozen_zero_stage: int = -1, gather: str = "once",
                 async_save: bool = True, memory_bytes: int = 0) -> StagePlan:
    """Per-role, per-phase bytes of one fp32 CPU PPO process (see the module docstring for every term);
    ``reserved`` is the runtime overhead. ``frozen_zero_stage`` -1: that of the trained roles."""
    frozen = zero_stage if frozen_zero_stage < 0 else frozen_zero_stage
    for name, z in (("--zero-stage", zero_stage), ("frozen ZeRO stage", frozen)):
        if z not in (1, 3):
            raise ValueError(f"{name} {z}: the CPU PPO plan models ZeRO-1 and ZeRO-3 (use 1 or 3)")
    if tp < 1 or dp < 1 or cfg.n_heads % tp or cfg.kv_heads % tp:
        raise ValueError(f"tp={tp}, dp={dp}: both >= 1 and tp must divide the {cfg.n_heads} heads and "
                         f"{cfg.kv_heads} KV heads")
    p, pv = _params(cfg, tp), _params(cfg, tp, lm_head=False)
    plan = StagePlan(stage="ppo", layout=Layout(tp=tp, dp=dp, zero_stage=zero_stage, micro_batch=shape.micro_batch),
                     resident={}, phases={}, reserved=runtime_overhead, memory_bytes=memory_bytes)
    frozen_bytes = {"weights": F * (p / dp if frozen == 3 else p)}
    plan.resident = {"policy": _trained_resident(p, dp=dp, zero_stage=zero_stage),
                     "value": _trained_resident(pv, dp=dp, zero_stage=zero_stage), "reference": frozen_bytes}
    for i in range(shape.reward_models):
        plan.resident[f"reward model {i + 1}"] = {"weights": F * (pv / dp if frozen == 3 else pv)}
    plan.phases["rollout"] = _rollout(cfg, p, tp=tp, zero_stage=zero_stage, gather=gather, shape=shape)
    plan.phases["scoring"] = _scoring(cfg, p, tp=tp, zero_stage=zero_stage, frozen_zero_stage=frozen, shape=shape)
    policy = _training(cfg, p, tp=tp, dp=dp, zero_stage=zero_stage, shape=shape, lm_head=True)
    value = _training(cfg, pv, tp=tp, dp=dp, zero_stage=zero_stage, shape=shape, lm_head=False)
    plan.phases["training"] = max(policy, value, key=lambda d: sum(d.values()))
    staged = {"staged policy shard": 3 * F * p / dp, "staged value shard": 3 * F * pv / dp}
    plan.phases["checkpoint"] = staged
    # The end-of-run exports come before the last checkpoint is published (asynchronous writes keep its staged
    # copies until then): each stages its role's fp32 weight fragments, and rank 0 streams one whole tensor.
    plan.phases["export"] = {**(staged if async_save else {}), "staged policy weights": F * p / dp,
                             "one whole tensor": F * max(cfg.vocab_size, cfg.ffn_dim) * cfg.dim}
    return plan


def model_bytes(plan: StagePlan) -> float:
    """The plan's peak without the runtime overhead."""
    return plan.peak - plan.reserved


# ---------------------------------------------------------------------------------------------- the probe
def probe_args(run_dir: Path) -> tuple[list[str], PPOShape]:
    """One process of PPO on ``debug_tiny`` (``configs/rlhf/ppo_tiny.toml``), and the shape its plan needs."""
    argv = ["--config", "configs/rlhf/ppo_tiny.toml", f"--model.name={PROBE_MODEL}", "--ppo.iterations=2",
            "--eval.every=0", "--ppo.prompts_per_iteration=8", "--train.global_batch_size=8",
            "--train.micro_batch_size=4", "--rollout.max_new_tokens=8", "--prompts.synthetic_count=64",
            "--checkpoint.every=0", f"--run.dir={run_dir}"]
    return argv, PPOShape(seq_len=16 + 8, micro_batch=4, local_minibatch=8, rollout_batch=8)


def measure_ppo_runtime_overhead(*, env: dict[str, str] | None = None, timeout_s: float = 300) -> float:
    """Bytes of the PPO runtime's fixed overhead: the peak RSS of a fresh one-process PPO run of ``debug_tiny``
    (``launch/ppo_rss.py``) minus that run's own plan."""
    from model.config import get_config

    with tempfile.TemporaryDirectory(prefix="ppo_overhead_") as tmp:
        argv, shape = probe_args(Path(tmp) / "run")
        result = subprocess.run([sys.executable, "-m", "launch.ppo_rss", str(Path(tmp) / "rss"), *argv],
                                capture_output=True, text=True, env=env or {**os.environ}, timeout=timeout_s,
                                check=False, cwd=Path(__file__).resolve().parents[1])
        if result.returncode:
            raise RuntimeError(f"PPO overhead probe (python -m launch.ppo_rss) failed with {result.returncode}:\n"
                               f"{result.stderr[-2000:]}")
        peak = json.loads((Path(tmp) / "rss" / "rank0.json").read_text())["peak"]
    plan = plan_cpu_ppo(get_config(PROBE_MODEL), tp=1, dp=1, zero_stage=1, shape=shape, runtime_overhead=0.0)
    return float(peak - model_bytes(plan))


def cmd_plan_cpu_ppo(args: object) -> int:
    """``python -m launch plan --stage ppo --device cpu``: one PPO process's host memory by role and phase."""
    from launch.stage_plan import describe
    from model.config import get_config

    cfg, tp = get_config(args.model), args.tp or 1
    if args.gpus % tp or not args.seq_len:
        raise ValueError(f"--gpus {args.gpus} (processes) must be a multiple of --tp {tp}, and --seq-len (prompt + "
                         "answer) is required")
    dp, mb = args.gpus // tp, args.micro_batch or 1
    seqs = (args.global_batch_tokens or 0) // args.seq_len or dp * mb
    if seqs % (dp * mb):
        raise ValueError(f"--global-batch-tokens / --seq-len = {seqs} rollouts per step must be a multiple of "
                         f"{dp} data-parallel ranks x --micro-batch {mb}")
    shape = PPOShape(seq_len=args.seq_len, micro_batch=mb, local_minibatch=seqs // dp,
                     rollout_batch=args.rollout_batch, reward_models=args.reward_models)
    measured = args.runtime_overhead is None
    overhead = measure_ppo_runtime_overhead() if measured else float(args.runtime_overhead)
    plan = plan_cpu_ppo(cfg, tp=tp, dp=dp, zero_stage=args.zero_stage or 1, shape=shape, runtime_overhead=overhead,
                        frozen_zero_stage=args.frozen_zero_stage or -1)
    if args.json:
        print(json.dumps({"model": cfg.name, "device": "cpu", "stage": "ppo", "plan": plan.to_dict()}, indent=2))
        return 0
    lines = describe(plan)
    lines[0] = lines[0].split("; fits")[0].replace(" GPUs)", " processes)") + " (one CPU process, fp32)"
    print("\n".join(line.replace("(CUDA context, NCCL, fragmentation)", "runtime overhead (python, torch, DeepSpeed; "
                                  + ("measured now on debug_tiny)" if measured else "--runtime-overhead)"))
                     for line in lines if "REFUSED" not in line))
    return 0
