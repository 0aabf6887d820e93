"""Host-memory plan of one CPU training process (fp32, DeepSpeed ZeRO-1/2, TP = PP = 1), with the runtime's
fixed overhead measured, not assumed.

    python -m launch plan --device cpu --model bench_25m --gpus 1 --seq-len 256 --global-batch-tokens 2048 \
        --micro-batch 8 --zero-stage 1          # --gpus = processes; measures the overhead (~10 s)
    python -m launch.cpu_plan --probe           # only the overhead probe, as JSON

    from launch.cpu_plan import plan_cpu_process, measure_runtime_overhead
    plan = plan_cpu_process(get_config("bench_25m"), seq_len=256, micro_batch=8, grad_accum=1,
                            zero_stage=1, dp=1, runtime_overhead=measure_runtime_overhead())
    plan.total        # bytes: peak resident memory of one `python -m train` process

What one process holds (P = parameters, dp = data-parallel size, T = tokens per micro-batch, all fp32), read
off DeepSpeed 0.19.8's ``stage_1_and_2.py`` and ``model/llama.py`` and checked tensor by tensor on CPU:
* weights 4P (DeepSpeed's flat parameter group), fp32 master partition 4P/dp (DeepSpeed clones its partition
  even when the weights already are fp32), Adam m and v 8P/dp, gradients 4P at the end of backward;
* activations of one micro-batch (``activation_bytes_per_token``) and, per block, the concatenated weights
  that ``fused_linear`` saves for backward (``[wq; wk; wv]`` and ``[w1; w3]``: (h + 2k + 2f) x h floats);
* transients: at the start of backward the gradients of the log-probabilities and of the logits (2 x T x
  vocab floats); in the optimizer step the flattened gradient partition (4P/dp) and torch AdamW's two
  temporaries (``sqrt(v)`` and the denominator, 8P/dp);
* the runtime overhead: resident memory of the same runtime (python, torch, deepspeed, megatron-core, the
  train/ modules, a gloo process group, the CPU kernels' workspaces) after two steps of ``debug_tiny``,
  minus that model's own states. Measured per machine by ``measure_runtime_overhead`` (~390 MiB here).
Peak = overhead + max(backward peak, optimizer-step peak). With one micro-batch per step (no accumulation) the
gradients do not exist yet at the backward peak, so they are left out of it.

The allocator. These figures are live bytes; RSS equals them when glibc returns freed memory to the system,
e.g. with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment (measured within 2% of this plan). With glibc's
default *dynamic* threshold, freed activation and gradient tensors stay in the heap and the resident size grows
over the first steps: +25-40% over live bytes for bench_25m here, not predictable from the model. Set the
variable (or use jemalloc/tcmalloc) when the host memory budget matters. Not modelled: ZeRO-3, offload, bf16,
activation checkpointing, TP/PP on CPU, checkpoint saving (host copies at save time come after the step peak).
PPO (five roles, ZeRO-3 and TP) has its own plan on these terms: ``launch/cpu_ppo_plan.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from model.config import LlamaConfig

FP32 = 4
MiB = 2**20
PROBE_MODEL = "debug_tiny"


@dataclass
class CpuProcessPlan:
    """Bytes of one CPU training process; ``phase`` names the peak ("backward" or "optimizer step")."""

    weights: float
    master_weights: float
    adam_states: float
    grads_at_peak: float
    activations: float
    fused_weight_copies: float
    logits_grads: float
    step_transients: float
    runtime_overhead: float
    phase: str
    backward_peak: float
    step_peak: float

    @property
    def model_bytes(self) -> float:
        """Everything that scales with the model and the batch (the peak without the runtime overhead)."""
        return max(self.backward_peak, self.step_peak)

    @property
    def total(self) -> float:
        return self.runtime_overhead + self.model_bytes

    def rows(self) -> list[tuple[str, float]]:
        """(label, bytes) line items at the peak, as ``python -m launch plan --device cpu`` prints them."""
        rows = [("weights (fp32)", self.weights), ("fp32 master partition", self.master_weights),
                ("Adam m + v", self.adam_states), ("gradients", self.grads_at_peak)]
        if self.phase == "backward":
            rows += [("activations (1 micro-batch)", self.activations),
                     ("fused qkv/w13 weight copies", self.fused_weight_copies),
                     ("logits grads (transient)", self.logits_grads)]
        else:
            rows += [("flat grads + AdamW temporaries", self.step_transients)]
        return rows + [("runtime overhead (python+torch+DS)", self.runtime_overhead), ("total", self.total)]

    def to_dict(self) -> dict[str, float | str]:
        return {**asdict(self), "model_bytes": self.model_bytes, "total": self.total}


def activation_bytes_per_token(cfg: LlamaConfig, seq_len: int, *, fused: bool | None = None) -> float:
    """Bytes autograd keeps per token of one micro-batch (fp32, document mask).

    ``fused``: whether the model runs the fused CPU path of ``model/kernels`` (default: whether it is enabled
    in this process). Per block (h = dim, k = kv_heads x head_dim, f = ffn_dim, a = heads), tensor by tensor:

    fused path (``model/kernels``):
      attention: norm input h + rstd, norm output h (input of the q/k/v GEMM), the attention's copies of k
                 and v 2k and of q h, its output h (also the ``wo`` input), and the probabilities of the
                 computed key blocks, a x ``attention_keys_per_query(seq)`` (``causal_attention``, up to
                 1024 tokens; beyond, SDPA: the logsumexp a)  -> 4h + 2k + 1 + a x keys;
      ffn:       norm input h + rstd, norm output h, [gate | up] 2f, silu(gate) * up f  -> 2h + 3f + 1;
    eager path:
      attention: norm input h, normalised h, norm output h, qkv output h + 2k, rotated q h, rotated k k,
                 SDPA output h + logsumexp a, the ``wo`` input (the transposed copy) h  -> 7h + 3k + a;
      ffn:       norm input h, normalised h, norm output h, [gate | up] 2f, silu(gate) f, silu * up f
                 -> 3h + 4f;  and the two rstd values.
    After the blocks: the final norm (3h), the log-probabilities (vocab) and the per-token loss; and once per
    token the boolean document mask (seq_len bytes).
    """
    from model import kernels

    h, f, a = cfg.dim, cfg.ffn_dim, cfg.n_heads
    k = cfg.kv_heads * cfg.head_dim
    if fused is None:
        fused = kernels.enabled()
    if fused:
        explicit = 1 < seq_len <= kernels.EXPLICIT_ATTENTION_MAX_SEQ
        probs = a * kernels.attention_keys_per_query(seq_len) if explicit else a
        block = FP32 * (6 * h + 2 * k + 3 * f + 2 + probs)
    else:
        block = FP32 * (10 * h + 3 * k + 4 * f + a + 2)
    return cfg.n_layers * block + FP32 * (3 * h + cfg.vocab_size + 1) + seq_len


def fused_weight_copy_bytes(cfg: LlamaConfig) -> float:
    """``torch.cat`` of [wq; wk; wv] and [w1; w3] per block, saved by autograd for backward (model/llama.py)."""
    k = cfg.kv_heads * cfg.head_dim
    return cfg.n_layers * FP32 * (cfg.dim + 2 * k + 2 * cfg.ffn_dim) * cfg.dim


def plan_cpu_process(cfg: LlamaConfig, *, seq_len: int, micro_batch: int, grad_accum: int, zero_stage: int,
                     dp: int = 1, runtime_overhead: float) -> CpuProcessPlan:
    """Peak resident bytes of one fp32 CPU training process (see the module docstring for every term)."""
    if zero_stage not in (1, 2):
        raise ValueError(f"--zero-stage {zero_stage}: the CPU plan models ZeRO-1/2 (what the engine runs "
                         "on CPU without offload); use --zero-stage 1 or 2")
    if micro_batch < 1 or grad_accum < 1 or dp < 1:
        raise ValueError(f"micro_batch={micro_batch}, grad_accum={grad_accum}, dp={dp} must all be >= 1")
    p = cfg.num_params()
    tokens = micro_batch * seq_len
    weights, master, adam, grads = FP32 * p, FP32 * p / dp, 2 * FP32 * p / dp, FP32 * p
    activations = activation_bytes_per_token(cfg, seq_len) * tokens
    copies = fused_weight_copy_bytes(cfg)
    logits_grads = 2 * FP32 * tokens * cfg.vocab_size
    states = weights + master + adam
    grads_in_backward = grads if grad_accum > 1 else 0.0  # accumulated from the previous micro-batch
    backward = states + grads_in_backward + activations + copies + logits_grads
    step_transients = FP32 * p / dp + 2 * FP32 * p / dp
    step = states + grads + step_transients
    phase = "backward" if backward >= step else "optimizer step"
    return CpuProcessPlan(weights=weights, master_weights=master, adam_states=adam,
                          grads_at_peak=grads_in_backward if phase == "backward" else grads,
                          activations=activations, fused_weight_copies=copies, logits_grads=logits_grads,
                          step_transients=step_transients, runtime_overhead=runtime_overhead, phase=phase,
                          backward_peak=backward, step_peak=step)


# ---------------------------------------------------------------------------------------------- the probe
def _resident_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line: the overhead probe needs Linux")


def probe(*, zero_stage: int = 1, steps: int = 2) -> dict[str, float]:
    """Run the training runtime on ``debug_tiny`` in this process and report what it keeps resident."""
    import gc

    from data_pipeline.global_batch import GlobalBatchLoader
    from data_pipeline.loader import pretrain_collate
    from train.config import RunConfig
    from train.data import build_datasets, seed_everything
    from train.engine import TrainEngine
    from train.topology import Topology

    overrides = [f"--model.name={PROBE_MODEL}", "--data.synthetic=true", "--data.seq_len=64",
                 "--train.global_batch_size=2", "--train.micro_batch_size=2", f"--train.steps={steps}",
                 "--train.eval_every=0", f"--zero.stage={zero_stage}", "--logging.wandb=false",
                 "--optim.warmup_steps=1"]
    cfg = RunConfig.from_toml(None, overrides)
    topo = Topology.initialize(tp=1, pp=1, timeout_s=120)
    seed_everything(cfg.train.seed)
    model_cfg = cfg.model_config()
    train_ds, _, eod = build_datasets(cfg, model_cfg, dp_size=1, run_dir=cfg.run_dir)
    engine = TrainEngine(model_cfg=model_cfg, engine_cfg=cfg.engine_config(), topology=topo)
    batches = iter(GlobalBatchLoader(train_ds, collate=pretrain_collate(eod), global_batch_size=2, micro_batch_size=2,
                                     dp_rank=0, dp_size=1))
    for _ in range(steps):
        engine.train_step(batches, 1e-3)
    gc.collect()
    rss = _resident_bytes()
    model_states = 4 * FP32 * model_cfg.num_params()  # weights + master + m + v of the probe model itself
    return {"rss_bytes": rss, "probe_model_states_bytes": model_states, "overhead_bytes": rss - model_states,
            "probe_model": PROBE_MODEL, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "")}


def measure_runtime_overhead(*, zero_stage: int = 1, env: dict[str, str] | None = None,
                             timeout_s: float = 300) -> float:
    """Bytes of the fixed runtime overhead, measured in a fresh subprocess with ``env`` (default: ours)."""
    result = subprocess.run([sys.executable, "-m", "launch.cpu_plan", "--probe", "--zero-stage", str(zero_stage)],
                            capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"runtime overhead probe (python -m launch.cpu_plan --probe) failed with "
                           f"{result.returncode}:\n{result.stderr[-2000:]}")
    return float(json.loads(lines[-1])["overhead_bytes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.cpu_plan", description=__doc__.split("\n")[0])
    parser.add_argument("--probe", action="store_true", help="measure the runtime overhead, print JSON")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(1, 2))
    args = parser.parse_args(argv)
    if not args.probe:
        parser.error("nothing to do: pass --probe (plans are printed by `python -m launch plan --device cpu`)")
    print(json.dumps(probe(zero_stage=args.zero_stage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
