"""Parallel-layout planner: per-GPU memory, FLOPs, step time and MFU for a Llama config on a GPU cluster.

    python -m launch plan --model llama3_1_405b --gpus 16384 --gpu h100-sxm --seq-len 8192 \
        --global-batch-tokens 16777216            # search: ranked layouts that fit
    python -m launch plan --model llama2_7b --gpus 8 --tp 1 --pp 1 --zero-stage 3 --json   # one layout

    from launch.planner import Layout, plan_memory, search
    plan_memory(cfg, Layout(tp=8, pp=16, dp=128), seq_len=8192).total   # bytes on the worst GPU

Memory model (bytes per GPU, worst pipeline stage; all figures are sums, i.e. the optimizer-step transients are
counted as if they coexisted with activations, which over-estimates by at most 4 B/param/DP):
* weights 2 B/param (bf16), grads 2 B/param (bf16), Adam mixed precision 12 B/param (fp32 master, m, v) and
  the fp32 gradient partition DeepSpeed casts to before ``step`` (4 B/param). ZeRO-1 partitions the 12+4 over
  DP, ZeRO-2 also the grads, ZeRO-3 also the weights (the fp32 grads then only per ``sub_group_size`` chunk).
  With ZeRO-3 the module being computed is gathered: 4 B x its params (bf16 weight + bf16 grad), which is
  DeepSpeed's "largest layer" term. TP divides everything but the RMSNorm weights; PP gives each stage its
  layers, the embedding to the first stage and the final norm + head to the last.
* activations: see ``activation_bytes_per_token``; 1F1B keeps ``pp - stage`` micro-batches in flight.
* communication buffers: DeepSpeed's reduce bucket (5e8 elements) and all-gather bucket, ZeRO-3's prefetch
  bucket, the pipeline send/recv tensors and the sequence-parallel all-gather of a layer input.
* a fixed allowance ``Hardware.reserved_bytes`` (CUDA context ~0.5 GiB, NCCL communicators and their
  buffers ~1 GiB, caching-allocator fragmentation ~1.5 GiB) = 3 GiB by default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from model.config import LlamaConfig, model_flops_per_token
from train.devices import DEVICES, device_spec

GiB = 1024**3
BF16, FP32 = 2, 4


_H100 = DEVICES["h100-sxm"]


@dataclass(frozen=True)
class Hardware:
    """The hardware model every time estimate derives from (defaults: H100 SXM 80 GB, 8 per node, 400G IB).

    ``hardware_for("a100-sxm-80gb")`` fills the device's figures from ``train/devices.py``."""

    name: str = _H100.label
    peak_tflops: float = _H100.bf16_tflops
    """Dense bf16 tensor-core peak per GPU; MFU is measured against it."""
    matmul_efficiency: float = 0.70
    """Fraction of peak large bf16 GEMMs and flash attention reach (H100: 650-750 TFLOP/s in practice)."""
    nonmatmul_overhead: float = 0.10
    """Time added on top of matmul time for memory-bound kernels (norms, RoPE, SiLU, residuals, loss)."""
    hbm_gbps: float = _H100.hbm_gbps
    nvlink_gbps: float = _H100.link_gbps
    """NVLink 4 bandwidth per direction per GPU, used by collectives inside a node."""
    ib_gbps: float = 50.0
    """Inter-node bandwidth per GPU (one 400 Gb/s NIC per GPU), used as soon as a group spans nodes."""
    nvlink_latency_us: float = 2.0
    ib_latency_us: float = 5.0
    """Per ring step latency; a ring over n ranks pays (n - 1) of them per collective."""
    gpus_per_node: int = 8
    memory_bytes: int = _H100.memory_bytes
    """Memory per GPU (the 3 GiB ``reserved_bytes`` cover what the driver and CUDA context take of it)."""
    reserved_bytes: int = 3 * GiB
    """Fixed allowance: CUDA context, NCCL buffers, allocator fragmentation (see module docstring)."""
    dp_overlap: float = 0.8
    """Fraction of the available compute window that hides data-parallel collectives (bucketed, prefetched)."""


def hardware_for(device: str, **overrides: object) -> Hardware:
    """The hardware model of a ``train/devices.py`` row (key or reported name), with ``overrides`` on top."""
    spec = device_spec(device)
    fields = dict(name=spec.label, peak_tflops=spec.bf16_tflops, hbm_gbps=spec.hbm_gbps,
                  nvlink_gbps=spec.link_gbps, memory_bytes=spec.memory_bytes)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Hardware(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ZeroBuffers:
    """DeepSpeed ZeRO defaults (deepspeed/runtime/zero/config.py), in elements."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    sub_group_size: int = 1_000_000_000


@dataclass(frozen=True)
class Layout:
    """One way to lay a model out: TP x CP x PP x DP GPUs, ZeRO stage, micro-batch, recomputation."""

    tp: int = 1
    cp: int = 1
    """Context parallelism (Llama 3): each sequence cut into 2 x CP chunks, CP rank i holds chunks i and
    2CP-1-i; attention all-gathers K/V over the CP group. Weights are replicated over CP, so gradients and
    ZeRO partitions span DP x CP."""
    pp: int = 1
    dp: int = 1
    zero_stage: int = 1
    micro_batch: int = 1
    activation_checkpointing: bool = False
    recompute_layers: int | None = None
    """With checkpointing: layers per stage recomputed (Megatron's block method); None = all of them."""
    virtual_stages: int = 1
    """Interleaved 1F1B chunks per stage. DeepSpeed's PipelineModule only runs 1 (Megatron/Meta run more)."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism (norm/residual activations sharded over TP); only matters when tp > 1.
    On by default like ``train/``'s ``parallel.sequence_parallel`` (unset: on at tp > 1 for pretraining, with PP
    and CP too; LoRA adapters too). The engine turns it off for the stages whose objectives do not run it
    (``launch/stage_plan.py`` plans those with it off)."""
    flash_attention: bool = True
    fused_norm: bool = True
    """Fused RMSNorm saves input + fp32 rstd; the eager reference form also keeps an fp32 copy of the input."""
    lora_rank: int = 0
    """LoRA (``[lora]`` of the alignment stages, ``model/lora.py``): adapters of this rank train, the bf16 base is
    frozen (no grads, no optimizer state); 0 = full training."""
    lora_targets: str = "q,k,v,o"
    """The adapted projections (comma list of q, k, v, o, gate, up, down)."""

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def shard_ranks(self) -> int:
        """Ranks that hold the same weights and split the gradient reduction and ZeRO partitions: DP x CP."""
        return self.dp * self.cp

    @property
    def sp(self) -> int:
        """The factor sequence parallelism divides the norm/residual activations by (1 when off or tp 1)."""
        return self.tp if (self.sequence_parallel and self.tp > 1) else 1

    def recomputed(self, stage_layers: int) -> int:
        if not self.activation_checkpointing:
            return 0
        return stage_layers if self.recompute_layers is None else min(self.recompute_layers, stage_layers)

    def describe(self) -> str:
        ckpt = "off" if not self.activation_checkpointing else (
            "full" if self.recompute_layers is None else f"{self.recompute_layers} layers/stage")
        v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
        sp = "+SP" if self.sp > 1 else ""
        cp = f" CP {self.cp}" if self.cp > 1 else ""
        return (f"TP {self.tp}{sp}{cp} PP {self.pp}{v} DP {self.dp} ZeRO-{self.zero_stage} "
                f"mb {self.micro_batch} ckpt {ckpt}")


def engine_refusals(layout: Layout, *, seq_len: int) -> list[str]:
    """Why ``train/`` cannot run ``layout`` as planned (empty: it can). The search still ranks such layouts
    (they say what a better engine would gain) but every plan carries these reasons and the CLI prints them."""
    reasons = []
    if layout.virtual_stages > 1:
        reasons.append("interleaved 1F1B: DeepSpeed's PipelineModule runs one chunk per stage")
    if layout.cp > 1 and seq_len % (2 * layout.cp):
        reasons.append(f"seq_len {seq_len} is not divisible by 2 x CP = {2 * layout.cp}")
    if layout.lora_rank and layout.pp > 1:
        reasons.append("LoRA runs with pp 1 only (train/parallelize.py refuses pipeline stages with adapters)")
    return reasons


# ---------------------------------------------------------------------------------------------- params
def split_layers(n_layers: int, pp: int) -> list[int]:
    """Transformer blocks per pipeline stage. Uneven splits give the short stages to the first and the last
    stage (they also hold the embedding / the head), as Meta did for 405B: 126 = 7 + 14 x 8 + 7 on PP 16."""
    if not 1 <= pp <= n_layers:
        raise ValueError(f"pp={pp} must be between 1 and n_layers={n_layers}")
    base, extra = divmod(n_layers, pp)
    counts = [base] * pp
    order = list(range(1, pp - 1)) + [pp - 1, 0] if pp > 2 else list(range(pp))[::-1]
    for stage in order[:extra]:
        counts[stage] += 1
    return counts


def block_params(cfg: LlamaConfig, tp: int) -> tuple[float, int]:
    """(TP-sharded params per block per TP rank, replicated norm params per block)."""
    kv = cfg.kv_heads * cfg.head_dim
    sharded = (2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.ffn_dim) / tp
    return sharded, 2 * cfg.dim


def stage_params(cfg: LlamaConfig, layout: Layout, stage: int) -> float:
    """Parameters one GPU of pipeline stage ``stage`` holds (before any ZeRO partitioning)."""
    layers = split_layers(cfg.n_layers, layout.pp)[stage]
    sharded, replicated = block_params(cfg, layout.tp)
    params = layers * (sharded + replicated)
    table = cfg.vocab_size * cfg.dim / layout.tp  # vocab-parallel embedding and head
    if stage == 0:
        params += table
    if stage == layout.pp - 1:
        params += cfg.dim + (0 if cfg.tie_embeddings and layout.pp == 1 else table)
    return params


def lora_params(cfg: LlamaConfig, layout: Layout, stage: int) -> float:
    """Adapter parameters one GPU of ``stage`` trains: r x (in + out) per adapted projection, / TP (A or B split)."""
    if not layout.lora_rank:
        return 0.0
    kv, q = cfg.kv_heads * cfg.head_dim, cfg.n_heads * cfg.head_dim
    shapes = {"q": (cfg.dim, q), "k": (cfg.dim, kv), "v": (cfg.dim, kv), "o": (q, cfg.dim),
              "gate": (cfg.dim, cfg.ffn_dim), "up": (cfg.dim, cfg.ffn_dim), "down": (cfg.ffn_dim, cfg.dim)}
    per_block = sum(layout.lora_rank * sum(shapes[t.strip()]) for t in layout.lora_targets.split(",") if t.strip())
    return split_layers(cfg.n_layers, layout.pp)[stage] * per_block / layout.tp


def largest_module_params(cfg: LlamaConfig, tp: int) -> float:
    """The largest single module (what ZeRO-3 gathers at once): the embedding/head, or w1/w2/w3."""
    return max(cfg.vocab_size * cfg.dim, cfg.dim * cfg.ffn_dim) / tp


# ---------------------------------------------------------------------------------------------- memory
@dataclass
class MemoryBreakdown:
    """Bytes on one GPU of the worst pipeline stage; ``per_stage`` holds every stage's total."""

    stage: int
    weights: float
    grads: float
    optimizer_states: float
    fp32_grads: float
    zero3_gathered: float
    activations: float
    logits: float
    comm_buffers: float
    reserved: float
    in_flight_microbatches: int
    recomputed_layers: int
    per_stage: list[float] = field(default_factory=list)

    @property
    def model_states(self) -> float:
        """Weights + grads + optimizer (+ fp32 grads and ZeRO-3 gathered layer): what DeepSpeed estimates."""
        return self.weights + self.grads + self.optimizer_states + self.fp32_grads + self.zero3_gathered

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.logits + self.comm_buffers + self.reserved

    def to_dict(self) -> dict[str, float | int | list[float]]:
        out = dataclasses.asdict(self)
        out.update(model_states=self.model_states, total=self.total)
        return out


def model_state_bytes(
    cfg: LlamaConfig, layout: Layout, stage: int, *, buffers: ZeroBuffers = ZeroBuffers()
) -> dict[str, float]:
    """Weights, grads, optimizer states, fp32 grad partition and ZeRO-3 gathered layer, in bytes."""
    p = stage_params(cfg, layout, stage)
    z, dp = layout.zero_stage, layout.shard_ranks
    if layout.lora_rank:  # frozen bf16 base + adapters; only the adapters have grads and optimizer state
        a = lora_params(cfg, layout, stage)  # ZeRO-3 partitions the frozen base too (gathered a module at a time)
        return {"weights": BF16 * (p + a) / (dp if z >= 3 else 1), "grads": BF16 * a / (dp if z >= 2 else 1),
                "optimizer_states": 12 * a / (dp if z >= 1 else 1), "fp32_grads": FP32 * a / (dp if z >= 1 else 1),
                "zero3_gathered": 2 * BF16 * largest_module_params(cfg, layout.tp) if z == 3 else 0.0}
    fp32_grad_elems = p / dp if z >= 1 else p
    if z == 3:  # stage3 casts the bf16 grad partition to fp32 one sub group at a time
        fp32_grad_elems = min(p / dp, buffers.sub_group_size)
    return {
        "weights": BF16 * p / (dp if z >= 3 else 1),
        "grads": BF16 * p / (dp if z >= 2 else 1),
        "optimizer_states": 12 * p / (dp if z >= 1 else 1),
        "fp32_grads": FP32 * fp32_grad_elems,
        "zero3_gathered": 2 * BF16 * largest_module_params(cfg, layout.tp) if z == 3 else 0.0,
    }


def activation_bytes_per_token(cfg: LlamaConfig, layout: Layout, seq_len: int) -> float:
    """Bytes one transformer block keeps for backward, per token this rank holds, on one TP rank (no
    recomputation). With context parallelism a rank holds ``seq_len / cp`` tokens of each sequence.

    Korthikanti et al. 2022 give sbh(34 + 5as/h) for a GPT block; ours, tensor by tensor (h = dim,
    k = kv_heads * head_dim, f = ffn_dim, a = n_heads, t = TP, r = t with sequence parallelism else 1,
    c = CP):
      attention: norm input 2h/r, rstd 4/r, norm output 2h/r (input of wq/wk/wv), q after RoPE 2h/t, k/v
                 after RoPE 2 x 2k/t, all-gathered over CP for the whole sequence (c x the local tokens' k/v:
                 2 x 2kc/t per local token), attention output 2h/t (also the wo input), logsumexp 4a/t (fp32);
      ffn:       norm input 2h/r, rstd 4/r, norm output 2h/r, w1 out 2f/t, w3 out 2f/t, silu out 2f/t,
                 silu*w3 (w2 input) 2f/t.
    Flash attention (the default) saves only the output and logsumexp and recomputes the probabilities, so
    there is no s^2 term; with the document mask on GPUs FlexAttention runs (``model/flex_attention.py``),
    which saves the same tensors (its block mask is O((s/128)^2) per sequence, not counted). Measured equal,
    tensor for tensor, on the eager bf16 block (``tests/unit/test_planner_matches_model.py``); without it the softmax output 2as/t per token (bf16, no dropout in Llama) is kept.
    Selective recomputation (Korthikanti) would only drop that s^2 term, which flash already removes, so the
    only recomputation modelled is the full-block one. The eager (unfused) RMSNorm also keeps the fp32 input.
    """
    h, f, a = cfg.dim, cfg.ffn_dim, cfg.n_heads
    k = cfg.kv_heads * cfg.head_dim
    t, r, c = layout.tp, layout.sp, layout.cp
    norm = 2 * h + FP32 + 2 * h + (0 if layout.fused_norm else FP32 * h)  # input, rstd, output (+fp32 copy)
    attention = 2 * norm / r + (2 * (h + 2 * k * c) + 2 * h + FP32 * a) / t
    if not layout.flash_attention:
        attention += 2 * a * seq_len / t
    ffn = 8 * f / t
    return attention + ffn


def in_flight(layout: Layout, stage: int, microbatches: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at the 1F1B peak, in units of whole stages.

    Plain 1F1B: pp - stage. Interleaved (Megatron): (pp - stage - 1) * 2 + (v - 1) * pp + 1 chunks of 1/v
    stage each."""
    p, v = layout.pp, layout.virtual_stages
    if v == 1:
        return min(microbatches, p - stage)
    chunks = (p - stage - 1) * 2 + (v - 1) * p + 1
    return min(microbatches * v, chunks) / v


def _stage_memory(cfg: LlamaConfig, layout: Layout, stage: int, *, seq_len: int, microbatches: int,
                  buffers: ZeroBuffers, hardware: Hardware) -> MemoryBreakdown:
    states = model_state_bytes(cfg, layout, stage, buffers=buffers)
    layers = split_layers(cfg.n_layers, layout.pp)[stage]
    tokens = layout.micro_batch * seq_len / layout.cp  # this rank's chunks of each sequence
    per_layer = activation_bytes_per_token(cfg, layout, seq_len) * tokens
    r = layout.sp
    kept_input = BF16 * cfg.dim / r * tokens  # a checkpointed block keeps only its input
    recomputed = layout.recomputed(layers)
    flight = in_flight(layout, stage, microbatches)
    activations = flight * ((layers - recomputed) * per_layer + recomputed * kept_input)
    if recomputed:
        activations += per_layer  # one block's working set while it is recomputed in backward
    logits = 0.0
    if stage == layout.pp - 1:  # bf16 logits + fp32 softmax kept by vocab-parallel cross-entropy
        logits = (BF16 + FP32) * cfg.vocab_size / layout.tp * tokens + BF16 * cfg.dim / r * tokens
    p = stage_params(cfg, layout, stage)
    z = layout.zero_stage
    if z == 0:
        comm = BF16 * min(buffers.reduce_bucket_size, p)
    elif z in (1, 2):  # contiguous-gradient ipg bucket (x2 with overlap_comm) + all-gather bucket
        comm = BF16 * buffers.reduce_bucket_size * (2 if z == 2 else 1)
        comm += BF16 * min(buffers.allgather_bucket_size, p)
    else:
        comm = BF16 * (buffers.reduce_bucket_size + buffers.prefetch_bucket_size)
    if layout.pp > 1:  # send/recv of activations and their grads (scatter-gathered over TP)
        comm += 4 * BF16 * cfg.dim / r * tokens
    if r > 1:  # the all-gathered sequence-parallel input of a column-parallel matmul
        comm += BF16 * cfg.dim * tokens
    return MemoryBreakdown(stage=stage, activations=activations, logits=logits, comm_buffers=comm,
                           reserved=hardware.reserved_bytes, in_flight_microbatches=math.ceil(flight),
                           recomputed_layers=recomputed, **states)


def plan_memory(cfg: LlamaConfig, layout: Layout, *, seq_len: int, microbatches: int | None = None,
                buffers: ZeroBuffers = ZeroBuffers(), hardware: Hardware = Hardware()) -> MemoryBreakdown:
    """Per-GPU memory of ``layout`` in bytes, for the pipeline stage that needs the most.

    ``microbatches`` (gradient-accumulation steps per optimizer step) caps the 1F1B in-flight count; None
    assumes at least ``pp``. Pass ``hardware=Hardware(reserved_bytes=0)`` and the engine's real bucket
    sizes to compare with a measured peak of a small CPU run.
    """
    m = layout.pp * layout.virtual_stages if microbatches is None else microbatches
    stages = [_stage_memory(cfg, layout, s, seq_len=seq_len, microbatches=m, buffers=buffers,
                            hardware=hardware) for s in range(layout.pp)]
    worst = max(stages, key=lambda b: b.total)
    worst.per_stage = [b.total for b in stages]
    return worst


# ---------------------------------------------------------------------------------------------- time
@dataclass
class StepEstimate:
    """Estimated seconds per optimizer step, split by cause, and the resulting MFU."""

    compute_s: float
    tp_comm_s: float
    cp_comm_s: float
    """K/V all-gathers (forward, recompute) and dK/dV reduce-scatters (backward) over the CP group; not
    overlapped with compute (Llama 3 all-gathers K/V before the local attention)."""
    pp_p2p_s: float
    bubble_s: float
    dp_comm_s: float
    dp_exposed_s: float
    optimizer_s: float
    step_s: float
    mfu: float
    bubble_fraction: float
    recompute_overhead: float
    """Extra FLOPs from recomputation, as a fraction of the model FLOPs on the critical stage."""

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _ring_seconds(nbytes: float, ranks: int, *, gbps: float, latency_us: float, allreduce: bool) -> float:
    """Ring all-gather / reduce-scatter (or all-reduce = both) of ``nbytes`` (the full buffer)."""
    if ranks <= 1:
        return 0.0
    factor = 2 if allreduce else 1
    return factor * ((ranks - 1) / ranks * nbytes / (gbps * 1e9) + (ranks - 1) * latency_us * 1e-6)


def _link(hardware: Hardware, span: int) -> tuple[float, float]:
    """(GB/s, latency us) for a group whose ranks span ``span`` consecutive GPUs. Ranks are laid out as Llama 3
    and ``train/topology.py`` do, [TP, CP, PP, DP] innermost first: a TP group spans TP GPUs, a CP group TP x CP,
    two adjacent pipeline stages 2 x TP x CP, a DP (x CP) group the whole job."""
    if span <= hardware.gpus_per_node:
        return hardware.nvlink_gbps, hardware.nvlink_latency_us
    return hardware.ib_gbps, hardware.ib_latency_us


def _layer_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    sharded, _ = block_params(cfg, 1)
    return 6.0 * sharded + 12 * cfg.dim * seq_len * 0.5


def _dp_comm(layout: Layout, *, params: float, layers: int, recomputed: int,
             microbatches: int, t_mb: float, hardware: Hardware, buffers: ZeroBuffers) -> tuple[float, float]:
    """(total seconds of data-parallel collectives per step, the part not hidden behind compute)."""
    # Weights are replicated over CP: the gradient reduction and ZeRO partitions span DP x CP ranks.
    gbps, lat = _link(hardware, layout.gpus)  # DP is the outermost dimension
    nbytes, dp, z, m = BF16 * params, layout.shard_ranks, layout.zero_stage, microbatches
    buckets = max(1, math.ceil(params / buffers.reduce_bucket_size))
    gather = _ring_seconds(nbytes, dp, gbps=gbps, latency_us=0, allreduce=False)
    one_lat = (dp - 1) * lat * 1e-6 if dp > 1 else 0.0
    if z == 0:
        comm, window = 2 * (gather + buckets * one_lat), 0.0
    elif z == 1:
        comm, window = 2 * (gather + buckets * one_lat), 0.0
    elif z == 2:  # reduce-scatter every micro-batch during backward, all-gather after the step
        comm, window = m * (gather + buckets * one_lat) + gather + buckets * one_lat, m * t_mb * 2 / 3
    else:  # per layer per micro-batch: gather fwd, gather bwd (+ recompute), reduce-scatter grads
        per_mb = (3 + recomputed / max(layers, 1)) * gather + (3 * layers + recomputed) * one_lat
        comm, window = m * per_mb, m * t_mb
    if z in (0, 1) and layout.pp == 1:
        window = t_mb * 2 / 3  # bucketed reduction overlaps the last micro-batch's backward
    # DeepSpeed's PipelineEngine reduces gradients only after the pipeline flush: nothing hides ZeRO-0/1+PP.
    return comm, max(0.0, comm - hardware.dp_overlap * window)


def estimate_step(cfg: LlamaConfig, layout: Layout, *, seq_len: int, global_batch_tokens: int,
                  hardware: Hardware = Hardware(), buffers: ZeroBuffers = ZeroBuffers()) -> StepEstimate:
    """Seconds per optimizer step of ``layout``: the slowest pipeline stage paces 1F1B, plus the bubble
    (p - 1) / v slots, plus exposed DP collectives and the (memory-bound) Adam step."""
    m = microbatches_per_step(layout, seq_len=seq_len, global_batch_tokens=global_batch_tokens)
    tokens = layout.micro_batch * seq_len / layout.cp  # this rank's share of its micro-batch
    r = layout.sp
    layer_f = _layer_flops_per_token(cfg, seq_len)
    speed = hardware.peak_tflops * 1e12 * hardware.matmul_efficiency / (1 + hardware.nonmatmul_overhead)
    tp_gbps, tp_lat = _link(hardware, layout.tp)
    pp_gbps, pp_lat = _link(hardware, layout.tp * layout.cp * 2)  # stage s and s + 1: TP x CP ranks apart
    tp_allreduce = _ring_seconds(BF16 * cfg.dim * tokens, layout.tp, gbps=tp_gbps, latency_us=tp_lat,
                                 allreduce=True)
    cp_gbps, cp_lat = _link(hardware, layout.tp * layout.cp)
    kv_bytes = BF16 * 2 * cfg.kv_heads * cfg.head_dim / layout.tp * layout.micro_batch * seq_len  # whole K+V
    kv_gather = _ring_seconds(kv_bytes, layout.cp, gbps=cp_gbps, latency_us=cp_lat, allreduce=False)
    p2p = 2 * layout.virtual_stages * (BF16 * cfg.dim / r * tokens / (pp_gbps * 1e9) + pp_lat * 1e-6)
    slowest = (0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0)
    for stage, layers in enumerate(split_layers(cfg.n_layers, layout.pp)):
        rec = layout.recomputed(layers)
        flops = layers * layer_f + rec * layer_f / 3
        model = layers * layer_f
        if stage == layout.pp - 1:
            flops += 6.0 * cfg.vocab_size * cfg.dim
            model += 6.0 * cfg.vocab_size * cfg.dim
        compute = flops * tokens / layout.tp / speed
        tp = (4 * layers + 2 * rec) * tp_allreduce
        cp = (2 * layers + rec) * kv_gather  # gather fwd, reduce-scatter bwd, gather again when recomputing
        pp = p2p if layout.pp > 1 else 0.0
        total = compute + tp + cp + pp
        if total > slowest[0]:
            slowest = (total, compute, tp, pp, flops / model - 1, rec, cp)
    t_mb, compute, tp, pp, overhead, rec, cp = slowest
    stage_max = max(range(layout.pp), key=lambda s: stage_params(cfg, layout, s))
    params = stage_params(cfg, layout, stage_max)
    layers = split_layers(cfg.n_layers, layout.pp)[stage_max]
    dp_comm, dp_exposed = _dp_comm(layout, params=params, layers=layers, recomputed=rec, microbatches=m,
                                   t_mb=t_mb, hardware=hardware, buffers=buffers)
    slots = (layout.pp - 1) / layout.virtual_stages
    bubble = t_mb * slots
    optimizer = 30 * params / (layout.shard_ranks if layout.zero_stage >= 1 else 1) / (hardware.hbm_gbps * 1e9)
    step = t_mb * m + bubble + dp_exposed + optimizer
    useful = model_flops_per_token(cfg, seq_len) * global_batch_tokens
    mfu = useful / (step * layout.gpus * hardware.peak_tflops * 1e12)
    return StepEstimate(compute_s=compute * m, tp_comm_s=tp * m, cp_comm_s=cp * m, pp_p2p_s=pp * m, bubble_s=bubble,
                        dp_comm_s=dp_comm, dp_exposed_s=dp_exposed, optimizer_s=optimizer, step_s=step,
                        mfu=mfu, bubble_fraction=slots / (m + slots), recompute_overhead=overhead)


def microbatches_per_step(layout: Layout, *, seq_len: int, global_batch_tokens: int) -> int:
    """Gradient-accumulation steps: global sequences / (DP x micro-batch); ValueError if not whole."""
    seqs, rest = divmod(global_batch_tokens, seq_len)
    if rest or seqs % (layout.dp * layout.micro_batch):
        raise ValueError(
            f"global batch of {global_batch_tokens} tokens = {global_batch_tokens / seq_len:g} sequences of "
            f"{seq_len} does not split into DP {layout.dp} x micro-batch {layout.micro_batch}; choose "
            "--global-batch-tokens as a multiple of seq_len * dp * micro_batch")
    return seqs // (layout.dp * layout.micro_batch)


# ---------------------------------------------------------------------------------------------- search
@dataclass
class Plan:
    """One evaluated layout: memory on the worst GPU, step-time estimate, and whether it fits."""

    layout: Layout
    memory: MemoryBreakdown
    step: StepEstimate
    microbatches: int
    fits: bool
    notes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    """Why ``train/`` cannot run this layout as planned (``engine_refusals``); empty when it can."""

    @property
    def runnable(self) -> bool:
        return not self.refusals

    def to_dict(self) -> dict[str, object]:
        return {"layout": dataclasses.asdict(self.layout), "microbatches": self.microbatches,
                "fits": self.fits, "memory": self.memory.to_dict(), "step": self.step.to_dict(),
                "notes": self.notes, "runnable": self.runnable, "refusals": self.refusals}


def evaluate(cfg: LlamaConfig, layout: Layout, *, seq_len: int, global_batch_tokens: int,
             hardware: Hardware = Hardware(), buffers: ZeroBuffers = ZeroBuffers()) -> Plan:
    """Memory + time of one fully specified layout (no fitting, no search)."""
    m = microbatches_per_step(layout, seq_len=seq_len, global_batch_tokens=global_batch_tokens)
    memory = plan_memory(cfg, layout, seq_len=seq_len, microbatches=m, buffers=buffers, hardware=hardware)
    step = estimate_step(cfg, layout, seq_len=seq_len, global_batch_tokens=global_batch_tokens,
                         hardware=hardware, buffers=buffers)
    plan = Plan(layout, memory, step, m, memory.total <= hardware.memory_bytes,
                refusals=engine_refusals(layout, seq_len=seq_len))
    plan.notes = explain(cfg, plan, hardware)
    if layout.tp > 1:  # both figures: what SP would save, or what turning it off costs
        other = dataclasses.replace(layout, sequence_parallel=not layout.sequence_parallel)
        alt = plan_memory(cfg, other, seq_len=seq_len, microbatches=m, buffers=buffers, hardware=hardware)
        on, off = (memory, alt) if layout.sp > 1 else (alt, memory)
        plan.notes.append(f"sequence parallelism {'on' if layout.sp > 1 else 'off'}: {memory.total / GiB:.1f} "
                          f"GiB/GPU; SP on {on.total / GiB:.1f} GiB, SP off {off.total / GiB:.1f} GiB "
                          f"(activations {on.activations / GiB:.1f} vs {off.activations / GiB:.1f} GiB)")
    plan.notes += [f"the engine cannot run this layout: {reason}" for reason in plan.refusals]
    return plan


def explain(cfg: LlamaConfig, plan: Plan, hardware: Hardware) -> list[str]:
    """Why this layout behaves as it does, one reason per parallel dimension."""
    lay, mem, st = plan.layout, plan.memory, plan.step
    notes = []
    if lay.cp > 1:
        where = "NVLink" if lay.tp * lay.cp <= hardware.gpus_per_node else "InfiniBand"
        notes.append(f"CP {lay.cp}: {lay.micro_batch} x {lay.cp * 2} chunks per micro-batch, each rank holds 2 "
                     f"(activations / {lay.cp}); K/V all-gathers on {where} take {st.cp_comm_s / st.step_s:.0%} "
                     "of the step; gradients and ZeRO span DP x CP")
    if lay.tp > 1:
        where = "NVLink" if lay.tp <= hardware.gpus_per_node else "InfiniBand (crosses nodes!)"
        notes.append(f"TP {lay.tp} keeps TP all-reduces on {where} ({st.tp_comm_s / st.step_s:.0%} of the "
                     f"step) and divides weights and activations by {lay.tp}")
    states = mem.weights + mem.grads + mem.optimizer_states + mem.fp32_grads
    params = stage_params(cfg, lay, mem.stage)
    notes.append(f"PP {lay.pp} puts {params / 1e9:.2f}B params on each GPU of stage {mem.stage}: "
                 f"model states {states / GiB:.1f} GiB at ZeRO-{lay.zero_stage}; bubble "
                 f"{st.bubble_fraction:.0%} with {plan.microbatches} micro-batches"
                 + (f" x {lay.virtual_stages} interleaved chunks" if lay.virtual_stages > 1 else ""))
    notes.append(f"DP {lay.dp}: {plan.microbatches} micro-batch(es) of {lay.micro_batch} per GPU per step; "
                 f"DP collectives {st.dp_comm_s:.2f} s, {st.dp_exposed_s:.2f} s exposed")
    if mem.recomputed_layers:
        notes.append(f"recomputes {mem.recomputed_layers} of {split_layers(cfg.n_layers, lay.pp)[mem.stage]} "
                     f"layers per stage to fit (+{st.recompute_overhead:.0%} FLOPs)")
    verdict = "fits" if plan.fits else "does NOT fit"
    notes.append(f"peak {mem.total / GiB:.1f} GiB of {hardware.memory_bytes / GiB:.0f} GiB ({verdict}); "
                 f"activations {mem.activations / GiB:.1f} GiB for {mem.in_flight_microbatches} in flight")
    return notes


def _powers_of_two(limit: int) -> Iterator[int]:
    value = 1
    while value <= limit:
        yield value
        value *= 2


def candidate_layouts(cfg: LlamaConfig, *, gpus: int, seq_len: int, global_batch_tokens: int,
                      hardware: Hardware, fixed: dict[str, object], max_virtual_stages: int = 1,
                      max_micro_batch: int = 16, max_cp: int = 32,
                      min_cp_tokens: int = 4096) -> Iterator[Layout]:
    """Every TP x CP x PP x DP x ZeRO x micro-batch x v (checkpointing is chosen later).

    TP in powers of two up to a node (TP across nodes is rejected: its per-layer all-reduces would run on
    InfiniBand); TP must divide the query and the KV heads. CP in powers of two up to ``max_cp`` with
    ``seq_len`` divisible by 2 x CP (the load-balanced chunking) and at least ``min_cp_tokens`` tokens per CP
    rank: the time model assumes full-size GEMMs and attention tiles and a K/V gather whose latency is
    amortised, which short chunks do not give (Llama 3 ran CP 1 at 8K and CP 16 at 128K: 8K tokens a rank). PP is any value up to n_layers (uneven
    stages allowed). ZeRO-2/3 only with PP 1 (DeepSpeed refuses them with a PipelineModule). Interleaving
    needs micro-batches divisible by PP (Megatron's rule) and at least v layers on each stage.
    ``fixed["sequence_parallel"]`` False turns SP off for every layout (default on at TP > 1: what the engine
    runs for pretraining).
    """
    seqs = global_batch_tokens // seq_len
    sp = bool(fixed.get("sequence_parallel", True))
    for tp, cp in ((t, c) for t in _powers_of_two(hardware.gpus_per_node) for c in _powers_of_two(max_cp)):
        if cfg.n_heads % tp or cfg.kv_heads % tp or fixed.get("tp", tp) != tp or fixed.get("cp", cp) != cp:
            continue
        if cp > 1 and (seq_len % (2 * cp) or seq_len // cp < min_cp_tokens):
            continue
        for pp in range(1, cfg.n_layers + 1):
            if gpus % (tp * cp * pp) or fixed.get("pp", pp) != pp:
                continue
            dp = gpus // (tp * cp * pp)
            if seqs % dp:
                continue
            for mb in _powers_of_two(min(max_micro_batch, seqs // dp)):
                if (seqs // dp) % mb or fixed.get("micro_batch", mb) != mb:
                    continue
                m = seqs // dp // mb
                for zero in (0, 1, 2, 3) if pp == 1 else (0, 1):
                    if fixed.get("zero_stage", zero) != zero:
                        continue
                    for v in _powers_of_two(max_virtual_stages if pp > 1 else 1):
                        if v > 1 and (m % pp or min(split_layers(cfg.n_layers, pp)) < v):
                            continue
                        if fixed.get("virtual_stages", v) != v:
                            continue
                        yield Layout(tp=tp, cp=cp, pp=pp, dp=dp, zero_stage=zero, micro_batch=mb,
                                     virtual_stages=v, sequence_parallel=sp)


def fit_checkpointing(cfg: LlamaConfig, layout: Layout, *, seq_len: int, global_batch_tokens: int,
                      hardware: Hardware, buffers: ZeroBuffers, checkpointing: bool | None) -> Plan:
    """Evaluate ``layout`` with the least recomputation that fits: off, else the smallest number of
    recomputed layers per stage (binary search; memory falls as more layers are recomputed)."""
    kw = dict(seq_len=seq_len, global_batch_tokens=global_batch_tokens, hardware=hardware, buffers=buffers)
    if checkpointing is not None:
        return evaluate(cfg, dataclasses.replace(layout, activation_checkpointing=checkpointing), **kw)
    plan = evaluate(cfg, dataclasses.replace(layout, activation_checkpointing=False), **kw)
    if plan.fits:
        return plan
    most = max(split_layers(cfg.n_layers, layout.pp))
    full = evaluate(cfg, dataclasses.replace(layout, activation_checkpointing=True), **kw)
    if not full.fits:
        return full
    lo, hi, best = 1, most - 1, full
    while lo <= hi:
        mid = (lo + hi) // 2
        trial = evaluate(cfg, dataclasses.replace(layout, activation_checkpointing=True, recompute_layers=mid),
                         **kw)
        if trial.fits:
            best, hi = trial, mid - 1
        else:
            lo = mid + 1
    return best


def search(cfg: LlamaConfig, *, gpus: int, seq_len: int, global_batch_tokens: int,
           hardware: Hardware = Hardware(), buffers: ZeroBuffers = ZeroBuffers(),
           fixed: dict[str, object] | None = None, max_virtual_stages: int = 1, top_k: int = 5,
           distinct: bool = True) -> list[Plan]:
    """Layouts that fit, fastest first. ``distinct`` keeps only the best variant of each TP x CP x PP x DP.

    ``fixed`` pins any of tp, cp, pp, zero_stage, micro_batch, virtual_stages, activation_checkpointing,
    sequence_parallel. Layouts the engine cannot run are ranked too; their ``Plan.refusals`` say why."""
    fixed = dict(fixed or {})
    checkpointing = fixed.pop("activation_checkpointing", None)
    plans = []
    for layout in candidate_layouts(cfg, gpus=gpus, seq_len=seq_len, global_batch_tokens=global_batch_tokens,
                                    hardware=hardware, fixed=fixed, max_virtual_stages=max_virtual_stages):
        plan = fit_checkpointing(cfg, layout, seq_len=seq_len, global_batch_tokens=global_batch_tokens,
                                 hardware=hardware, buffers=buffers, checkpointing=checkpointing)
        if plan.fits:
            plans.append(plan)
    plans.sort(key=lambda p: p.step.step_s)
    if distinct:
        seen: set[tuple[int, int, int, int]] = set()
        unique = []
        for plan in plans:
            key = (plan.layout.tp, plan.layout.cp, plan.layout.pp, plan.layout.dp)
            if key not in seen:
                seen.add(key)
                unique.append(plan)
        plans = unique
    return plans[:top_k]
