"""The training engine: steps, evaluation and checkpoints of one model under TP x PP x ZeRO (DeepSpeed).

    engine = TrainEngine(model_cfg=model_cfg, engine_cfg=run_cfg.engine_config(), topology=topo)
    result = engine.train_step(micro_batches, lr)     # StepResult(loss, grad_norm, skipped, tokens)
    engine.eval_loss(micro_batches, num_batches); engine.save(dir, client_state); engine.load(dir)
    with engine.exported_weights(out_dir) as reader:  # collective; rank 0 streams the model from every rank's
        if reader: write_native(reader.source(model_cfg), model_cfg, out_dir)   # fragments, one tensor at a time

Composition (the Megatron-DeepSpeed way), built by ``train/parallelize.py`` in a fixed order: megatron-core
tensor-parallel layers inside our Llama (``model/parallel.py``), the objective's wrap, activation checkpointing,
DeepSpeed ``PipelineModule`` over the flat stage list (``train/pipeline.py``) when ``pp > 1``, DeepSpeed ZeRO
over the data-parallel group. Without PP, DeepSpeed gets the TP group through the ``mpu`` adapter
(``train/topology.py``); with PP its pipeline grid orders ranks the same way. The engine reads a narrow
``train.config.EngineConfig`` (layout, ZeRO, optimizer, precision, seed, batch sizes), not a whole run config.

Loss normalisation: the step's loss is the mean over *all* loss tokens of the global batch (every micro-batch
and every DP rank), not a mean of per-micro-batch means, so padding or masked SFT prompts weigh nothing.
Each micro-batch's summed token loss is multiplied by ``gas * dp / global_tokens``; DeepSpeed divides by
``gas`` in backward and averages over DP, which leaves exactly ``sum(loss) / global_tokens``.

Checkpoints (``train/engine_checkpoint.py``): every rank saves, restores and exports only its own shard, its
ZeRO fragment of its TP slice of its pipeline stage (fp32 master weights + Adam moments), as safetensors with
the fragment's place in the full tensor (``portable/tp00-pp00-dp000.safetensors``); DeepSpeed's own pickled
checkpoint is not used. ``load`` reads any saved layout (TP2 x PP2 -> TP1 x DP4): only the slices this rank
owns; ``python -m train.consolidate`` and the end-of-run export stream the same files one tensor at a time.
The module's random initialisation runs only for weights no checkpoint provides.

CPU vs GPU: the CPU path (gloo) never calls CUDA; on GPUs the engine uses bf16 (if configured), fused AdamW,
flash SDPA (automatic for causal bf16 attention) and overlapped ZeRO communication. On CPU: fused AdamW too,
and ZeRO-1 without DeepSpeed's contiguous gradient buffer (``train.parallelize.deepspeed_config``): the one-process ZeRO-1 step
costs ~1.05x a plain PyTorch loop on the same model (``benchmarks/bench_train.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model import comm
from model.config import LlamaConfig
from model.llama import init_llama_weights
from train import pipeline as pipe
from train.config import ConfigError, EngineConfig
from train.deepspeed_api import deepspeed
from train.engine_checkpoint import EngineCheckpoint
from train.objective import LanguageModelObjective, Objective
from train.parallelize import (
    apply_zero,
    context_parallel,
    layer_factory,
    pad_sequence_keys,
    parallelize_llama,
    resolve_sequence_parallel,
)
from train.sharded_state import assign_parameter, create_zero3_optimizer_state


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    tokens: int


class TrainEngine:
    """One model under TP x PP x ZeRO; see the module docstring. Every method is collective."""

    def __init__(self, *, model_cfg: LlamaConfig, engine_cfg: EngineConfig, topology: Any,
                 objective: Objective | None = None, init_weights: dict[str, Tensor] | None = None,
                 inference_only: bool = False) -> None:
        """``objective``: what to train (default ``LanguageModelObjective``); ``init_weights``: full tensors by
        native name (a pretrained / SFT checkpoint) copied over the seeded initialisation, each cut to this
        rank's TP slice; names the checkpoint lacks (a new reward head) keep their seeded values.
        ``inference_only``: a frozen model that only scores (``forward``): no optimizer, no fp32 master
        weights, weights in the run's dtype (``train.parallelize.apply_zero_inference``)."""
        self.inference_only = inference_only
        if engine_cfg.zero.stage not in (1, 2, 3):
            raise ConfigError(f"zero.stage={engine_cfg.zero.stage}: the engine runs ZeRO stages 1-3 (stage 1 costs "
                              "nothing over plain data parallelism and shards the optimizer states)")
        self.model_cfg, self.engine_cfg, self.topo = model_cfg, engine_cfg, topology
        self.pipelined = topology.pp_size > 1
        self.objective = objective or LanguageModelObjective(document_mask=engine_cfg.document_mask)
        if self.pipelined and not self.objective.supports_pipeline:
            raise ConfigError(f"{type(self.objective).__name__} does not run under pipeline parallelism; "
                              "use --parallel.pp=1 (tensor parallelism and ZeRO work)")
        self.device = topology.device
        self.gas = engine_cfg.grad_accum(topology.world_size)
        # DeepSpeed's communication layer wraps the process group Topology made (PipelineModule needs it).
        deepspeed.init_distributed(dist_backend=topology.backend, dist_init_required=False)
        self.sequence_parallel = resolve_sequence_parallel(model_cfg, engine_cfg, topology=topology,
                                                           objective=self.objective)
        self.factory = layer_factory(topology, sequence_parallel=self.sequence_parallel)
        self.padded_batches = 0
        """Micro-batches padded to a multiple of TP for sequence parallelism (``_to_device``)."""
        self.cp = context_parallel(engine_cfg, topology=topology, objective=self.objective)
        self.module = parallelize_llama(model_cfg, engine_cfg, topology=topology, objective=self.objective,
                                        layers=self.factory)  # steps 1-4 of train/parallelize.py
        self.ds: Any = None  # step 5 (ZeRO) lazily, so that a checkpoint load can fill the weights first
        self.io = EngineCheckpoint(self)
        # Seeded random init only for weights no checkpoint provides: deferred until the DeepSpeed engine is
        # built (``_engine``), skipped when a resume (``load``) or complete initial weights fill them first.
        self._weights_filled = False
        if init_weights is not None:
            self.load_weights(init_weights)
        self._nan_steps = {int(s) for s in os.environ.get("LLAMA_TEST_NAN_STEPS", "").split(",") if s}
        self._steps_taken = 0

    # ---- construction ------------------------------------------------------------------------------
    def native_name(self, name: str) -> str:
        """The plain ``Llama`` parameter name of one of this module's parameters."""
        if self.pipelined:
            return pipe.native_name(name, n_layers=self.model_cfg.n_layers)
        return self.objective.native_name(name.removeprefix("module."))

    def _seed_init(self, only: set[str] | None = None) -> None:
        """The seeded init of every weight (``only``: of these native names; the rest come from a checkpoint)."""
        if not self._weights_filled:
            init_llama_weights(self.module, seed=self.engine_cfg.seed, n_layers=self.model_cfg.n_layers,
                               native_name=self.native_name, assign=assign_parameter, only=only)
            self._weights_filled = only is None

    @torch.no_grad()
    def load_weights(self, weights: Any, *, strict: bool = False) -> list[str]:
        """Initial weights (before DeepSpeed) from a ``WeightReader`` (``model.checkpoints.open_checkpoint``: only
        this rank's TP slices are read) or a dict of full tensors by native name. Names the source lacks (a new
        reward head) get their seeded values; returns them."""
        if self.ds is not None:
            raise RuntimeError("load_weights must come before the first step")
        reader = weights if hasattr(weights, "read_slice") else DictWeights(weights)
        names = set(reader.names())
        missing = [self.native_name(n) for n, _ in self.module.named_parameters() if self.native_name(n) not in names]
        if missing:
            self._seed_init(only=set(missing))  # the few tensors the source lacks get their seeded values
        self.io.load_weights(reader)
        self._weights_filled = True
        if strict and missing:
            raise KeyError(f"initial weights lack {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return missing

    def _engine(self) -> Any:
        if self.ds is None:
            self._seed_init()
            self.ds = apply_zero(self.module, self.engine_cfg, topology=self.topo,  # step 5
                                 inference_only=self.inference_only)
        return self.ds

    @property
    def trained_module(self) -> nn.Module:
        """The objective's module that DeepSpeed wraps (builds the DeepSpeed engine on first use)."""
        return self._engine().module

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        opt = self._engine().optimizer
        return getattr(opt, "optimizer", opt)

    # ---- steps -------------------------------------------------------------------------------------
    def _global_tokens(self, batches: list[dict[str, Tensor]]) -> float:
        key = self.objective.weight_key
        # Every CP rank holds the whole batch here (it keeps its chunks only in _to_device): count over DP.
        local = torch.tensor([float(sum(float(mb[key].sum()) for mb in batches))], device=self.device)
        if self.topo.dp_size > 1:
            comm.all_reduce(local, group=self.topo.dp_group)
        return float(local.item())

    def _set_lr(self, lr: float) -> None:
        for group in self._engine().optimizer.param_groups:
            group["lr"] = lr

    def _to_device(self, mb: dict[str, Tensor], *, keys: tuple[str, ...] | None = None) -> dict[str, Tensor]:
        """This rank's inputs (``keys``, default the objective's ``input_keys``): with context parallelism its two
        chunks of every sequence and their positions; under sequence parallelism a batch of any length padded to
        a multiple of TP (``pad_sequence_keys``), so that the split is exact."""
        moved = {k: mb[k].to(self.device, non_blocking=True) for k in keys or self.objective.input_keys}
        if self.sequence_parallel and not self.cp.enabled and moved["input_ids"].shape[1] % self.topo.tp_size:
            moved = pad_sequence_keys(moved, getattr(self.objective, "sequence_keys", ()), self.topo.tp_size)
            self.padded_batches += 1
        if self.cp.enabled:
            seq = moved["input_ids"].shape[1]
            moved = {k: self.cp.shard(v) for k, v in moved.items()}
            moved["positions"] = self.cp.positions(seq, self.device)
        return moved

    def _pipe_batch(self, mb: dict[str, Tensor], scale: Tensor | None,
                    target_keys: tuple[str, ...] | None = None) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``((tokens, document_ids), (targets..., scale))``: the first stage's inputs, the last stage's loss
        targets (``objective.pipeline_target_keys``, default labels and loss mask). An objective whose batches have
        no ``document_ids`` (one sequence per row) gets zeros: every row one document, i.e. causal attention."""
        keys = target_keys or getattr(self.objective, "pipeline_target_keys", ("labels", "loss_mask"))
        d = self._to_device(mb, keys=("input_ids", *keys, *(("document_ids",) if "document_ids" in mb else ())))
        docs = d["document_ids"] if "document_ids" in d else torch.zeros_like(d["input_ids"])
        return (d["input_ids"], docs), tuple(d[k] for k in keys) + (() if scale is None else (scale,))

    @torch.no_grad()
    @contextlib.contextmanager
    def _whole_sequence_pipe(self, ds: Any) -> Any:
        """Around a pipelined forward without autograd under sequence parallelism: those forwards pass whole
        sequences between stages (``model.sequence_parallel.SplitState``), training passes s / tp slices, and
        DeepSpeed's pipe sizes its receive buffers once from the first shape it sees; both switches reset them."""
        if self.sequence_parallel:
            ds.reset_activation_shape()
        try:
            yield
        finally:
            if self.sequence_parallel:
                ds.reset_activation_shape()

    def pipeline_forward(self, batches: list[dict[str, Tensor]], *, target_keys: tuple[str, ...]) -> list[Tensor]:
        """Pipelined scoring: DeepSpeed's inference schedule over ``batches``, the last stage's loss function called
        with ``target_keys`` and no scale (an objective's scoring form, e.g. DPO's sequence log-probs: one value per
        row), one 1-D tensor per micro-batch on every stage (summed over the PP group from zeros: only the last stage has them).
        Micro-batches must give outputs of one size (DeepSpeed accumulates them). Collective."""
        ds = self._engine()
        ds.total_loss = None  # DeepSpeed's eval_batch adds to the last train_batch's scalar otherwise
        with self._whole_sequence_pipe(ds):
            outputs = ds.eval_batch(iter([self._pipe_batch(mb, None, target_keys) for mb in batches]),
                                    reduce_output=None, bcast_loss=False, num_micro_batches=len(batches))
        ds.total_loss = None
        ds.module.train()
        sizes = [int(mb["input_ids"].shape[0]) for mb in batches]  # one score per row
        flat = (torch.cat([o.reshape(-1).float() for o in outputs]) if self.topo.is_last_stage
                else torch.zeros(sum(sizes), device=self.device))
        comm.all_reduce(flat, group=self.topo.pp_group)
        return list(flat.cpu().split(sizes))

    def forward(self, **inputs: Any) -> Any:
        """The training module's forward (no loss scaling) on this rank, e.g. reward scores for evaluation.

        Tensors move to the device; other values (a KV cache) pass as they are. Without PP the call goes through
        the DeepSpeed engine, whose prologue lets ZeRO-3 gather parameters a parent module reads from its
        children (the fused q/k/v and gate/up projections); ``module(...)`` directly would see them empty.
        """
        if self.cp.enabled:
            raise ConfigError("engine.forward runs whole sequences; with parallel.cp > 1 only training and "
                              "eval_loss split them (score with parallel.cp=1)")
        ds = self._engine()
        moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        return ds.module(**moved) if self.pipelined else ds(**moved)

    def gathered_parameters(self, params: list[Tensor] | None = None) -> Any:
        """A context in which every parameter of this rank (or only ``params``) is whole (its TP shard), e.g. to
        copy the weights for generation: under ZeRO-3 one gather of those partitions on entry, released on exit
        (read-only; collective: every rank passes the same parameters); a no-op at stages 1-2."""
        ds = self._engine()
        if self.engine_cfg.zero.stage != 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(list(ds.module.parameters()) if params is None else params,
                                                 modifier_rank=None)

    def train_step(self, micro_batches: Any, lr: float) -> StepResult:
        """One optimizer step over ``gas`` micro-batches of this DP rank (see the module docstring)."""
        if self.inference_only:
            raise RuntimeError("train_step on an inference-only engine (a frozen role): build it trainable")
        ds = self._engine()
        self._steps_taken += 1
        batches = [next(micro_batches) for _ in range(self.gas)]
        global_tokens = self._global_tokens(batches)
        # DeepSpeed averages gradients over DP x CP (the ranks holding the same weights); each CP rank's loss sums
        # only its chunks' tokens, so the sum over DP x CP of the scaled losses is the global token mean.
        factor = self.gas * self.topo.dp_cp_size / max(global_tokens, 1.0)
        if self._steps_taken in self._nan_steps:  # test hook: a poisoned step must be skipped, not applied
            factor = float("nan")
        scale = torch.tensor(factor, device=self.device)
        self._set_lr(lr)
        skipped_before = ds.skipped_steps
        if self.pipelined:
            loss = float(ds.train_batch(iter([self._pipe_batch(mb, scale) for mb in batches])))
        else:
            total = torch.zeros((), device=self.device)
            for mb in batches:
                step_loss = ds(**self._to_device(mb), scale=scale)
                ds.backward(step_loss)
                ds.step()
                total += step_loss.detach().float()
            if self.topo.dp_cp_size > 1:
                comm.all_reduce(total, group=self.topo.dp_cp_group)
            loss = float(total) / (self.gas * self.topo.dp_cp_size)
        norm = ds.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        skipped = ds.skipped_steps > skipped_before or not math.isfinite(loss) or not math.isfinite(grad_norm)
        tokens = int(global_tokens)
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=skipped, tokens=tokens)

    @torch.no_grad()
    def eval_loss(self, micro_batches: Any, num_batches: int) -> float:
        """Mean token loss over ``num_batches`` micro-batches of every DP rank."""
        ds = self._engine()
        batches = [next(micro_batches) for _ in range(num_batches)]
        if self.pipelined:
            # Each CP rank sums its chunks' tokens and DeepSpeed averages over DP x CP: cp / count is the mean.
            weight = self.objective.weight_key
            items = [self._pipe_batch(mb, torch.tensor(self.cp.size / max(float(mb[weight].sum()), 1.0),
                                                       device=self.device)) for mb in batches]
            with self._whole_sequence_pipe(ds):
                loss = ds.eval_batch(iter(items), num_micro_batches=num_batches)
            ds.module.train()
            return float(loss)
        ds.module.eval()
        sums = torch.zeros(2, device=self.device)
        for mb in batches:
            d = self._to_device(mb)
            sums[0] += ds(**d, scale=torch.tensor(1.0, device=self.device)).float()
            sums[1] += d[self.objective.weight_key].sum()
        ds.module.train()
        if self.topo.dp_cp_size > 1:
            comm.all_reduce(sums, group=self.topo.dp_cp_group)
        return float(sums[0] / sums[1].clamp(min=1))

    # ---- checkpoints -------------------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        # "dp" counts the ZeRO partitions (DP x CP): checkpoints do not see context parallelism.
        return {"tp": self.topo.tp_size, "pp": self.topo.pp_size, "dp": self.topo.dp_cp_size,
                "zero_stage": self.engine_cfg.zero.stage, "offload": self.engine_cfg.zero.offload,
                "dtype": self.engine_cfg.dtype, "model": self.model_cfg.to_dict()}

    def save(self, checkpoint_dir: Path, client_state: dict[str, Any]) -> dict[str, Any]:
        """This rank's shard into ``checkpoint_dir`` (which rank 0 made); returns the files written with their size
        and SHA-256 (``train/engine_checkpoint.py``)."""
        return self.io.stage(Path(checkpoint_dir), client_state)()

    def stage_save(self, checkpoint_dir: Path, client_state: dict[str, Any]) -> Any:
        """Asynchronous save: copy this rank's shard to host memory now; the returned function writes it."""
        return self.io.stage(Path(checkpoint_dir), client_state)

    def load(self, checkpoint_dir: Path) -> dict[str, Any]:
        """Resume from a checkpoint of any layout: this rank reads only its slices and fragments."""
        if self.engine_cfg.lora is not None:  # LoRA checkpoints hold the adapters: the frozen base is the initial
            self._seed_init()                 # weights' (or, without any, the seeded init's)
        result = self.io.load(Path(checkpoint_dir))
        self._weights_filled = True
        return result

    def exported_weights(self, out_dir: Path) -> Any:
        """Collective context: rank 0 gets a reader streaming the whole model one tensor at a time (None elsewhere),
        built from every rank's own fragments; see ``EngineCheckpoint.exported``. Trained with LoRA, the reader is the
        merged model and the adapters are also written in the PEFT format to ``<out_dir>_lora/``."""
        from model.checkpoints.lora_adapters import lora_export

        return lora_export(self.io.exported(Path(out_dir)), self.engine_cfg.lora, out_dir)

    def _create_optimizer_state(self) -> None:
        """Materialise AdamW's lazily created state with a zero-gradient, zero-LR step (changes nothing)."""
        if create_zero3_optimizer_state(self._engine().optimizer):
            return
        base = self.base_optimizer
        saved_lr = [g["lr"] for g in base.param_groups]
        for group in base.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        base.step()
        for group, lr in zip(base.param_groups, saved_lr):
            group["lr"] = lr
            for p in group["params"]:
                p.grad = None

    def _link_optimizer_state(self) -> None:
        """Point every parameter's ZeRO fragment at the current Adam moments.

        DeepSpeed links them once, right after the *first* parameter group's first step, so groups stepped
        after it (our no-decay group) stay unlinked and ``safe_get_full_optimizer_state`` fails for them.
        Relinking is cheap (views into the flat partitions) and idempotent.
        """
        opt = self._engine().optimizer
        if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _adam_step(self) -> int:
        for state in self.base_optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def _set_adam_step(self, step: int) -> None:
        for state in self.base_optimizer.state.values():
            if "step" in state:
                state["step"].fill_(step) if torch.is_tensor(state["step"]) else state.update(step=step)


class DictWeights:
    """Full tensors by native name (tests, small models) in ``WeightReader``'s shape: names, read, read_slice."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        self.weights, self.source = weights, "initial weights"

    def names(self) -> list[str]:
        return list(self.weights)

    def read(self, name: str) -> Tensor:
        return self.weights[name]

    def read_slice(self, name: str, *, dim: int, start: int, stop: int) -> Tensor:
        return self.weights[name].narrow(dim, start, stop - start)
