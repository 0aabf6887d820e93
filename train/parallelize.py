"""One place turns the plain Llama into the module that trains under TP x PP x ZeRO (like torchtitan's
``parallelize_llama``).

    from train.parallelize import layer_factory, parallelize_llama, apply_zero
    layers = layer_factory(topology)
    module = parallelize_llama(model_cfg, engine_cfg, topology=topology, objective=objective, layers=layers)
    ... fill the weights (seeded init, a pretrained checkpoint, a re-sharding resume) ...
    ds = apply_zero(module, engine_cfg, topology=topology)      # the DeepSpeed engine

The order, and why it is this one:

1. **Tensor parallelism: the layers.** ``Llama(cfg, layers=...)`` takes its linear and embedding layers from a
   ``LayerFactory`` (``model/layers.py``: plain at TP 1, megatron-core column/row-parallel above), so each rank
   holds only its slices from the start; swapping layers after construction would mean building every weight
   whole first. The model is built here and nowhere else (objectives only wrap it).
2. **The objective wraps the model** (``Objective.wrap``: the loss module of pretraining/SFT, the reward head,
   the PPO policy or value module). It comes after TP because some wraps read the TP group (vocab-parallel
   log-probs), and before checkpointing so that what is recomputed is only the blocks, not the loss.
3. **Activation checkpointing** of segments of ``parallel.activation_checkpoint_every`` blocks
   (``Llama.checkpoint_every``; DeepSpeed's ``activation_checkpoint_interval`` on pipeline stages), after the
   wrap so that every objective gets it the same way.
4. **Pipeline stages** (``pp > 1``): DeepSpeed's ``PipelineModule`` over the flat stage list of
   ``train/pipeline.py`` (embedding, blocks, norm + head) with the objective's loss on the last stage (the
   language-model loss, or ``objective.pipeline_loss``: DPO); it builds only this
   rank's stages (the 405B model never exists whole on one rank), so 1-3 happen per stage there.
5. **ZeRO** (``apply_zero``): ``deepspeed.initialize`` with our AdamW over the data-parallel group. Last,
   because ZeRO copies the parameters it is given into its optimizer state: they must be final (TP-sliced,
   wrapped, and filled) before. At ZeRO-3 (no PP) steps 1-2 already run inside ``deepspeed.zero.Init``
   (``partitioned_construction``), so a rank never holds its whole TP shard: each module is partitioned as
   its ``__init__`` returns and the weights are then written into this rank's partitions. Every other layout
   builds steps 1-2 (and each pipeline stage) on the ``meta`` device and gives the parameters empty storage
   (``model/materialize.py``): torch's default init draws nothing, and each weight is written once, between 4
   and 5, by the seeded init or a checkpoint's slices. ``TrainEngine`` applies step 5 lazily, after initial
   weights or a re-sharding resume are copied in.

DeepSpeed is imported only inside steps 4 and 5 (through ``train/deepspeed_api.py``), so the plain reference loop
(``train/reference.py``) builds its module with ``build_module`` without importing it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from model import comm
from model.config import LlamaConfig
from model.context_parallel import ContextParallel
from model.layers import LayerFactory, LocalLayers
from model.llama import Llama
from model.materialize import build_unfilled, skipped_default_init
from train import pipeline as pipe
from train.config import ConfigError, EngineConfig
from train.objective import LanguageModelObjective, Objective, decay_groups, masked_loss_sum


def layer_factory(topology: Any, *, dtype: torch.dtype = torch.float32,
                  sequence_parallel: bool = False) -> LayerFactory:
    """Step 1: plain layers at TP 1 (no megatron import at all), megatron-core layers above; with
    ``sequence_parallel`` their Megatron sequence-parallel forms (``model/sequence_parallel.py``)."""
    if topology.tp_size == 1:
        return LocalLayers()
    if sequence_parallel:
        from model.sequence_parallel import SequenceParallelLayers

        return SequenceParallelLayers(params_dtype=dtype)
    from model.parallel import MegatronLayers

    return MegatronLayers(params_dtype=dtype)


def sequence_parallel_obstacle(model_cfg: LlamaConfig, cfg: EngineConfig, *, tp: int, cp: int,
                               objective: Objective) -> str:
    """Why Megatron sequence parallelism cannot run here ("" when it can). It runs the objectives that declare
    ``supports_sequence_parallel`` (the language model, the reward model, DPO, PPO's policy and value model, the
    distillation student: their heads read the sequence gathered back, ``model.sequence_parallel``; LoRA adapters
    follow their layers' split, ``model.lora``), with TP-sharded K/V projections, on pipeline stages too (every
    objective that runs there: its last-stage loss reads the head stage's gathered logits, its targets padded with
    the inputs; the language model, DPO, the distillation student), on fixed lengths that TP x CP divides or on
    varying lengths that the engine pads to a multiple of TP (the objective's ``sequence_keys``)."""
    if tp == 1:
        return "parallel.tp=1 (sequence parallelism splits the sequence over the tensor-parallel ranks)"
    name = type(objective).__name__
    if not getattr(objective, "supports_sequence_parallel", False):
        return f"the {name} objective runs without it (language-model, reward-model, DPO, PPO and distillation " \
               "training run it)"
    if model_cfg.n_kv_heads % tp:
        return f"tp={tp} does not divide n_kv_heads={model_cfg.n_kv_heads} (replicated K/V projections)"
    if cfg.seq_len == 0 and not getattr(objective, "sequence_keys", ()):
        return f"this stage's batches vary in length and the {name} objective names no sequence_keys to pad"
    if cfg.seq_len % (tp * cp):
        return f"seq_len={cfg.seq_len} is not divisible by tp x cp = {tp * cp}"
    return ""


def resolve_sequence_parallel(model_cfg: LlamaConfig, cfg: EngineConfig, *, topology: Any, objective: Objective,
                              print_fn: Any = print) -> bool:
    """``parallel.sequence_parallel`` as it will run: unset -> on at tp > 1 wherever it can run, else off with one
    line saying why; ``true`` where it cannot run -> ``ConfigError``; ``false`` -> off."""
    asked = cfg.parallel.sequence_parallel
    tp, cp = topology.tp_size, getattr(topology, "cp_size", 1)
    if asked is False or (asked is None and tp == 1):
        return False
    obstacle = sequence_parallel_obstacle(model_cfg, cfg, tp=tp, cp=cp, objective=objective)
    if obstacle and asked:
        raise ConfigError(f"parallel.sequence_parallel=true cannot run here: {obstacle}; "
                          "set parallel.sequence_parallel=false (or leave it unset: on wherever it can run)")
    if obstacle:
        if getattr(topology, "global_rank", 0) == 0:
            print_fn(f"sequence parallelism off (tp {tp}): {obstacle}", flush=True)
        return False
    return True


def pad_sequence_keys(batch: dict[str, Tensor], keys: tuple[str, ...], multiple: int) -> dict[str, Tensor]:
    """``batch`` with its ``[b, s, ...]`` fields ``keys`` padded with zeros at the end of ``s`` to a length that
    ``multiple`` (TP) divides: sequence parallelism then splits every batch exactly (the embedding would otherwise
    run a batch TP does not divide whole). Zeros are masked positions in every objective that names its keys (loss /
    answer masks 0; pad tokens after the last real one, which causal attention never lets an earlier token see)."""
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if not extra:
        return batch
    return {k: nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, extra))
            if k in keys and v.dim() >= 2 and v.shape[1] == length else v for k, v in batch.items()}


def apply_activation_checkpointing(model: Llama, every: int) -> None:
    """Step 3: recompute segments of ``every`` blocks in backward (0 = off); bitwise the same result."""
    model.checkpoint_every = every


def build_module(model_cfg: LlamaConfig, cfg: EngineConfig, *, objective: Objective, layers: LayerFactory,
                 construction: Any = None, device: str | torch.device = "cpu") -> nn.Module:
    """Steps 1-3 in one process or one pipeline-less rank: the objective's module around a TP-sliced Llama.
    (The plain reference loop, ``train/reference.py``, builds its module here too, with ``LocalLayers``.)
    ``construction``: the context the modules are built in (``partitioned_construction``: ZeRO-3); without one
    the module is built on the meta device and given empty storage on ``device`` (``model/materialize.py``):
    torch's default init draws nothing, the caller writes every weight (seeded init or a checkpoint)."""
    if cfg.lora is not None and cfg.zero.stage == 3 and cfg.lora.base_dtype != "fp32":
        raise ConfigError(f"lora.base_dtype={cfg.lora.base_dtype!r} with zero.stage=3: ZeRO-3 holds the frozen base "
                          "partitioned in the run's dtype; use train.dtype=bf16 (or lora.base_dtype=fp32, or "
                          "zero.stage 1/2)")

    built: list[Llama] = []

    def build() -> nn.Module:  # 1-2; what the wrap adds (a reward or value head) is built the same way
        model = Llama(model_cfg, layers=layers)  # 1
        built.append(model)
        if cfg.lora is not None:  # 1b: adapters on the TP layers, the model's own weights frozen (model/lora.py)
            from model.lora import apply_lora

            apply_lora(model, cfg.lora, seed=None)  # drawn by the seeded init (init_std), like every weight
        return objective.wrap(model, layers=layers)  # 2: what the wrap adds (a reward head) stays trainable

    if construction is not None:  # partitioned as built; torch's default init skipped: every weight is written later
        with construction, skipped_default_init():
            module = build()
    else:
        module = build_unfilled(build, device=device)
    apply_activation_checkpointing(built[0], cfg.parallel.activation_checkpoint_every)  # 3
    return module


def pipeline_partition(model_cfg: LlamaConfig, pp: int) -> list[tuple[int, int]]:
    """``[(first, last_exclusive)]`` per stage over the flat list (embedding, blocks, head), as DeepSpeed's
    ``partition_method="uniform"`` cuts it: 405B = 128 entries over 16 stages -> embedding + 7 blocks first,
    8 blocks in the middle, 7 blocks + head last (Llama 3's own balancing)."""
    from train.deepspeed_api import partition_uniform

    parts = partition_uniform(num_items=model_cfg.n_layers + 2, num_parts=pp)
    return [(parts[i], parts[i + 1]) for i in range(pp)]


def _pipe_loss(tp_size: int, logits: Tensor, targets: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    labels, loss_mask, scale = targets
    return masked_loss_sum(logits, labels, loss_mask, tp_size=tp_size) * scale


def pipeline_module(model_cfg: LlamaConfig, cfg: EngineConfig, *, topology: Any, layers: LayerFactory,
                    objective: Objective | None = None) -> nn.Module:
    """Step 4: this rank's pipeline stages (each built with ``layers``: step 1, on the meta device and then given
    empty storage: the engine writes every weight) with the objective's loss on the
    last stage (step 2: ``objective.pipeline_loss(tp_size=)`` when it has one, else the language-model loss) and
    DeepSpeed's activation checkpointing of the blocks (step 3)."""
    from train.deepspeed_api import LayerSpec, PipelineModule
    from train.topology import pipeline_grid

    class UnfilledLayerSpec(LayerSpec):  # each stage built on meta, then empty storage (model/materialize.py)
        def build(self, log: bool = False) -> nn.Module:
            return build_unfilled(lambda: LayerSpec.build(self, log=log), device=topology.device)

    specs = [UnfilledLayerSpec(cls, model_cfg, layers, *args)
             for cls, args in pipe.stage_builders(model_cfg, document_mask=cfg.document_mask)]
    # DeepSpeed's data axis is every rank holding the same stage weights: DP x CP, over our [TP, CP, PP, DP].
    grid = pipeline_grid(tp=topology.tp_size, cp=getattr(topology, "cp_size", 1), pp=topology.pp_size,
                         dp=topology.dp_size)
    checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    make_loss = getattr(objective, "pipeline_loss", None)
    loss_fn = make_loss(tp_size=topology.tp_size) if make_loss else functools.partial(_pipe_loss, topology.tp_size)
    return PipelineModule(layers=specs, topology=grid, loss_fn=loss_fn, partition_method="uniform",
                          dynamic_shape=bool(getattr(objective, "pipeline_dynamic_shape", False)),
                          activation_checkpoint_interval=cfg.parallel.activation_checkpoint_every,
                          activation_checkpoint_func=checkpoint_fn, checkpointable_layers=["BlockStage"])


def context_parallel(cfg: EngineConfig, *, topology: Any, objective: Objective) -> ContextParallel:
    """This rank's ``ContextParallel`` (``model/context_parallel.py``; off at CP 1), after refusing what it cannot
    run: a topology of another CP size (a stage that does not build its topology with ``cfg.parallel.cp``),
    pipeline stages (they do not carry the chunks' positions) and objectives other than the language model."""
    size = getattr(topology, "cp_size", 1)
    if cfg.parallel.cp != size:
        raise ConfigError(f"parallel.cp={cfg.parallel.cp} but this stage runs a topology of cp {size}: context "
                          "parallelism runs pretraining and SFT-style language-model training; set parallel.cp=1")
    if size > 1 and type(objective) is not LanguageModelObjective:
        raise ConfigError(f"parallel.cp={size} runs the language-model objective; this run trains "
                          f"{type(objective).__name__}: set parallel.cp=1")
    return ContextParallel(topology.cp_group if size > 1 else None)


def parallelize_llama(model_cfg: LlamaConfig, cfg: EngineConfig, *, topology: Any, objective: Objective,
                      layers: LayerFactory) -> nn.Module:
    """Steps 1-4 (the module docstring): the module ZeRO will wrap. ``layers`` = ``layer_factory(topology)``.
    With context parallelism every attention module gets the CP kernel (after step 1: a pinned kernel)."""
    context = context_parallel(cfg, topology=topology, objective=objective)
    if topology.pp_size > 1:
        if cfg.lora is not None:
            raise ConfigError("LoRA ([lora] rank > 0) does not run under pipeline parallelism yet; use "
                              "--parallel.pp=1 (tensor parallelism and ZeRO work)")
        module = pipeline_module(model_cfg, cfg, topology=topology, layers=layers, objective=objective)
        for stage in module.modules():
            if isinstance(stage, pipe.BlockStage):
                stage.context = context
    else:
        module = build_module(model_cfg, cfg, objective=objective, layers=layers,
                              construction=partitioned_construction(cfg, topology=topology),
                              device=topology.device)
    context.pin(module)
    if getattr(layers, "sequence_parallel", False):  # the layers are sequence-parallel (``resolve_sequence_parallel``)
        from model.sequence_parallel import sum_norm_grads_over_tp

        module.sequence_split = layers.tp_size  # apply_zero: DeepSpeed's pipe must not re-split them

        sum_norm_grads_over_tp(module, topology.tp_group)
    return module


def partitioned_construction(cfg: EngineConfig, *, topology: Any) -> Any | None:
    """ZeRO-3 (without PP): ``deepspeed.zero.Init``, in which every module is partitioned over the DP x CP group
    as soon as its ``__init__`` returns, so a rank never holds more of its TP shard than one module whole (a
    block's linear layers, the embedding) plus its own partition of the rest. The weights are then written into
    the partitions (``train.sharded_state.assign_parameter``: the seeded init, a checkpoint), and ``apply_zero``
    finds them partitioned already. The same DeepSpeed config (and group) as step 5, so the partitions are the
    ones ZeRO-3 trains on. With LoRA the frozen base is partitioned the same way (each rank holds 1/DP of it, with
    no optimizer state) and the adapters too. Other stages build whole TP shards: ZeRO-1/2 keep every weight on
    every DP rank anyway."""
    if cfg.zero.stage != 3 or topology.pp_size > 1:
        return None  # build_module then builds on the meta device
    from train.deepspeed_api import deepspeed

    mpu = topology.deepspeed_mpu()
    return deepspeed.zero.Init(data_parallel_group=mpu.get_data_parallel_group(), mpu=mpu,
                               config_dict_or_path=zero_config(cfg, topology=topology))


# ---------------------------------------------------------------------------------------------------
# Step 5: ZeRO
# ---------------------------------------------------------------------------------------------------
def deepspeed_config(cfg: EngineConfig, *, dp: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config, from the typed engine config alone."""
    z = cfg.zero
    gas = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    # contiguous_gradients copies every gradient into a bucket as backward produces it, so that GPU memory
    # does not fragment. ZeRO-1 partitions no gradients during backward, and on CPU there is no fragmentation
    # to avoid: the copy is pure cost (~0.5 s of a 4.7 s step for a 56M model on 2 cores), so CPU ZeRO-1
    # all-reduces the gradients where autograd left them (the same sums; tests/distributed holds within 1e-5).
    contiguous = cuda or z.stage != 1
    zero: dict[str, Any] = {"stage": z.stage, "overlap_comm": cuda, "contiguous_gradients": contiguous,
                            "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if z.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if z.stage == 3:
        zero.update({"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e4})
    if cfg.offload_params:  # ZeRO-Infinity's parameter offload: partitions in host memory, gathered per module
        if z.stage != 3:
            raise ConfigError(f"parameter offload needs ZeRO stage 3 (its partitions are what moves to host memory); "
                              f"this engine runs stage {z.stage}")
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        # ZeRO-Offload with our torch AdamW (DeepSpeedCPUAdam would JIT-compile for minutes on CPU).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def zero_config(cfg: EngineConfig, *, topology: Any) -> dict[str, Any]:
    """``deepspeed_config`` for this topology. DeepSpeed's data-parallel world is DP x CP (the mpu's group): its
    batch arithmetic counts each sequence once per CP rank (each holds 1/cp of it), so the "global batch" it
    checks is cp times ours (step 5 and ``partitioned_construction`` must agree, or DeepSpeed refuses)."""
    config = deepspeed_config(cfg, dp=topology.dp_size, cuda=topology.device.type == "cuda")
    config["train_batch_size"] *= getattr(topology, "cp_size", 1)
    return config


def apply_zero(module: nn.Module, cfg: EngineConfig, *, topology: Any, inference_only: bool = False) -> Any:
    """Step 5: the DeepSpeed engine over ``module`` (ZeRO over the data-parallel group, our AdamW).
    ``inference_only``: see ``apply_zero_inference``."""
    from train.deepspeed_api import deepspeed

    if inference_only:
        return apply_zero_inference(module, cfg, topology=topology)

    o, device = cfg.optim, topology.device
    # Fused AdamW: one pass over (param, grad, m, v) instead of ~10 elementwise kernels. On CPU it matters more
    # than on GPU: ZeRO flattens each parameter group into one tensor, and the unfused kernels then stream it
    # from memory once per kernel (50M fp32 parameters on 2 cores: 190 ms per step unfused, 16 ms fused). Same
    # update to float rounding (~1 ulp). CUDA with offload keeps the unfused one: its optimizer state lives on
    # the host there, a path not tested fused.
    fused = device.type == "cpu" or not cfg.zero.offload
    optimizer = torch.optim.AdamW(decay_groups(module, o.weight_decay), lr=0.0, betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=fused or None)
    config = zero_config(cfg, topology=topology)
    if getattr(module, "sequence_split", 1) > 1:
        # DeepSpeed's pipe engine cuts the activation it sends between stages into 1/TP pieces and all-gathers
        # them on the receiving TP group, assuming every TP rank holds the same tensor. Under sequence
        # parallelism each holds its own s / tp slice already: send it whole, rank to rank.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    # Without PP, DeepSpeed gets the TP group through the mpu adapter; PipelineModule has its own grid.
    mpu = None if topology.pp_size > 1 else topology.deepspeed_mpu()
    ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, mpu=mpu,
                                       dist_init_required=False)
    _skip_single_rank_allreduce(ds.optimizer)
    return ds


def apply_zero_inference(module: nn.Module, cfg: EngineConfig, *, topology: Any) -> Any:
    """A frozen model (PPO's reference and reward models) that only runs forwards: no optimizer, hence no fp32
    master weights, Adam moments or gradient buffers; weights in the run's dtype (bf16 on GPUs). ZeRO-3:
    DeepSpeed's parameter partitioning without an optimizer (each rank keeps 1/DP of its TP shard and gathers a
    module while it runs, as in training); ZeRO-1/2 (which partition only optimizer state) become a plain
    TP-sharded module."""
    from train.deepspeed_api import deepspeed

    for param in module.parameters():
        param.requires_grad_(False)
    config = zero_config(cfg, topology=topology)
    config.pop("gradient_clipping")
    if cfg.zero.stage < 3:
        config["zero_optimization"] = {"stage": 0}
        config["bf16"] = {"enabled": False}  # DeepSpeed's bf16 "optimizer" would keep fp32 copies: cast here
        if cfg.dtype == "bf16":
            module.to(torch.bfloat16)
    mpu = None if topology.pp_size > 1 else topology.deepspeed_mpu()
    ds, _, _, _ = deepspeed.initialize(model=module, optimizer=None, config=config, mpu=mpu,
                                       dist_init_required=False)
    ds.eval()
    return ds


def _skip_single_rank_allreduce(optimizer: Any) -> None:
    """With one data-parallel rank, ZeRO-1/2's gradient all-reduce is the identity, yet DeepSpeed (0.19) still
    flattens every gradient bucket into one new tensor, divides it by 1, all-reduces it over one rank and
    copies every gradient back out of it (``allreduce_and_copy``): ~0.1 s of a 4.3 s CPU step for a 56M model,
    which ZeRO's own step then flattens again. Here the buckets go straight to the partition buffer (the one
    thing that call does that matters). Only that exact case: stage 1/2 optimizer, one rank, no sequence
    parallelism, no communication dtype conversion; anything else runs DeepSpeed's code."""
    from train.deepspeed_api import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not hasattr(optimizer, "allreduce_and_copy"):
        return
    if comm.world_size(optimizer.dp_process_group) != 1 or optimizer.sequence_parallel_size != 1:
        return
    original = optimizer.allreduce_and_copy

    def allreduce_and_copy(small_bucket: list[Tensor], communication_data_type: torch.dtype, rank: Any = None,
                           log: Any = None, divide: bool = True, process_group: Any = None,
                           output_bucket: list[Tensor | None] | None = None) -> None:
        group = optimizer.dp_process_group if process_group is None else process_group
        if comm.world_size(group) != 1 or any(t.dtype != communication_data_type for t in small_bucket):
            return original(small_bucket, communication_data_type, rank=rank, log=log, divide=divide,
                            process_group=process_group, output_bucket=output_bucket)
        for grad, output in zip(small_bucket, output_bucket or [None] * len(small_bucket)):
            optimizer._add_to_grad_partition_buffer(output, grad)

    optimizer.allreduce_and_copy = allreduce_and_copy
