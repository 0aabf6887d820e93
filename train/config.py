"""The typed run configuration: the sections every stage shares, and pretraining's root config ``RunConfig``.

    from train.config import RunConfig
    cfg = RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", ["--train.steps=20", "--run.dir", "runs/x"])
    cfg.validate(world_size=1)          # ConfigError (a ValueError) quoting the bad value and the fix
    cfg.save_toml("runs/x/config.toml") # the resolved config; RunConfig.from_toml reads it back unchanged

Every section is a frozen dataclass; every field has a docstring (the schema is ``docs/TRAIN_INTERFACES.md``;
``python -m train --help`` prints it). Reading, overrides, ``to_toml`` and ``--help`` are ``train.config_reader``'s,
shared by every stage: the alignment stages' configs (``rlhf.sft.config.SFTConfig``, ``rlhf.reward.config``,
``rlhf.gatt.task.GAttConfig``, ``rlhf.ppo.config.PPOConfig``) are ``RunConfig`` subclasses that add their own
section(s). ``[model.overrides]`` is a free table of ``LlamaConfig`` fields (``--model.overrides.vocab_size=4096``),
checked against ``LlamaConfig``. ``--resume X`` is a shortcut for ``--run.resume X``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from train.config_reader import (  # noqa: F401  (coerce, parse_overrides, tomllib: re-exported for callers)
    ConfigError,
    RootConfig,
    check,
    coerce,
    parse_overrides,
    tomllib,
)


@dataclass(frozen=True)
class ModelSection:
    name: str = "debug_tiny"
    """Registry name in ``model/config.py`` (``python -m model info NAME``)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """``LlamaConfig`` fields replaced on top of the registry entry (e.g. ``vocab_size`` to match a tokenizer)."""


@dataclass(frozen=True)
class DataSection:
    path: str = ""
    """A ``python -m data_pipeline prepare`` output directory (manifest.json) or a mixture JSON file."""
    synthetic: bool = False
    """Deterministic synthetic documents instead of ``path`` (tests and benchmarks without data)."""
    tokenizer: str = ""
    """tokenizer.model path; checked against the data manifest and the model's vocab_size when given."""
    seq_len: int = 256
    """Tokens per training sequence (packed documents)."""
    split: str = "98,1,1"
    """train,valid,test weights of the document split (megatron convention)."""
    document_mask: bool = True
    """Llama 3's document mask: packed documents never attend to each other (on GPUs a FlexAttention block
    mask, ``model/flex_attention.py``). false = plain causal attention over the whole sequence (Llama 1/2's
    practice; SDPA's flash kernel)."""
    synthetic_document_length: int = 0
    """Mean tokens per synthetic document (lengths uniform in [L/2, 3L/2]); 0 = 4-47 tokens, the learnable
    default. The GPU MFU benchmark sets 1024 so the document mask skips a realistic share of attention."""


@dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    """Optimizer steps of the whole run (the LR schedule ends here)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (tokens = this x seq_len)."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank; accumulation = global / (micro x dp)."""
    seed: int = 1234
    """Seeds the weights, the data order and every RNG."""
    dtype: str = "fp32"
    """"fp32" or "bf16" (bf16 mixed precision with fp32 master weights)."""
    eval_every: int = 50
    """Validation every N steps (and at the end); 0 = never."""
    eval_batches: int = 4
    """Micro-batches per validation pass (the same held-out samples every time)."""
    log_every: int = 1
    """Console progress line every N steps (the JSONL log gets every step)."""
    max_consecutive_nonfinite: int = 5
    """Abort after this many NaN/Inf steps in a row (each one is skipped and counted)."""
    collective_timeout_s: int = 600
    """Seconds before a hung collective fails with the rank and the operation named."""
    spike_factor: float = 3.0
    """A loss above this many times its running mean is logged as a spike."""
    preflight: bool = True
    """Before any allocation, estimate this process's memory (model states) and refuse when it exceeds this
    machine's (CPU RAM per local process, or the GPU's memory); false skips the check."""


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr x this at the last step (Llama: 10%)."""
    min_lr: float = -1.0
    """Absolute final LR; overrides min_lr_ratio when >= 0 (Llama 3 405B: 8e-7)."""
    warmup_steps: int = 2000
    """Linear warmup from 0 to lr."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-5
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (matrices only: not norms)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 = off."""


@dataclass(frozen=True)
class ParallelSection:
    tp: int = 1
    """Tensor-parallel size (megatron-core layers); divides n_heads, n_kv_heads and the GPUs per node."""
    pp: int = 1
    """Pipeline-parallel size (DeepSpeed PipelineModule); divides n_layers sensibly."""
    cp: int = 1
    """Context-parallel size (Llama 3, ``model/context_parallel.py``): each sequence is cut into 2 x cp chunks
    over cp ranks that all-gather K/V in attention; data.seq_len must be a multiple of 2 x cp. Pretraining and
    SFT (the language-model objective); combines with TP, PP, DP and ZeRO."""
    activation_checkpoint_every: int = 0
    """Activation checkpointing in segments of N blocks (recomputed in backward; DeepSpeed's interval); 0 = off."""
    sequence_parallel: bool | None = None
    """Megatron sequence parallelism (``model/sequence_parallel.py``): norms and residuals keep s / tp tokens per
    TP rank. Unset (default): on whenever tp > 1 and the run supports it (pretraining / SFT with a fixed
    data.seq_len divisible by tp x cp, with PP, CP, ZeRO; the reward model, DPO and distillation (both with PP too), PPO,
    their varying-length batches padded to a multiple of tp; LoRA too), otherwise off with one log line naming why
    (``train.parallelize.resolve_sequence_parallel``). true: required (an error where it cannot run, or at tp 1);
    false: off."""


@dataclass(frozen=True)
class ZeroSection:
    stage: int = 1
    """DeepSpeed ZeRO stage 1-3 (only 1 with pp > 1: DeepSpeed refuses 2/3 with pipeline parallelism)."""
    offload: bool = False
    """ZeRO-Offload of optimizer states to CPU memory."""


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 50
    """Checkpoint every N steps (and on SIGTERM/SIGUSR1 and at the end); 0 = only those."""
    keep_last: int = 3
    """Keep the K newest published checkpoints; older ones are deleted after a new one is published."""
    async_save: bool = True
    """Training waits only for the copy of this rank's shard to host memory; files, fsync and publication
    happen in a background thread (``train/checkpointing.py``). False: every rank waits for the publication."""


@dataclass(frozen=True)
class LoggingSection:
    wandb: bool = True
    """Log to Weights & Biases (offline unless you are logged in); the run id survives resumes."""
    wandb_project: str = "llama-stack"
    """wandb project name."""
    wandb_mode: str = ""
    """"" = auto (online if logged in, else offline), or "online" / "offline" / "disabled"."""
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard (if tensorboard is installed)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device that MFU is measured against; 0 = the dense datasheet figure of the GPU
    (``train/devices.py``, matched on the name CUDA reports), or a measured matmul peak on CPU / unknown GPUs."""
    gpu: str = ""
    """A ``train/devices.py`` key (``python -m launch devices``) whose figures MFU uses instead of the row
    matched from the reported name (a renamed cloud part); "" = match the name."""


@dataclass(frozen=True)
class RunSection:
    dir: str = "runs/default"
    """Run directory: checkpoints/, config.toml, metrics.jsonl, wandb/, report/."""
    resume: str = "none"
    """"none", "auto" (newest intact checkpoint in dir; damaged ones are skipped with a warning; none saved yet
    -> start fresh; only damaged ones -> exit 2), "auto-or-fresh" (as auto, but start fresh when only damaged
    ones are left) or a checkpoint directory."""


@dataclass(frozen=True)
class LoopEvalSection:
    """Benchmarks and held-out perplexity on the live model during training (``evaluation/in_loop.py``)."""

    every: int = 0
    """Run them every N steps and after the last step; 0 = never."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval task names (``python -m evaluation tasks``: lambada_openai, hellaswag, piqa, arc_easy, winogrande,
    boolq, wikitext), or the include_path folders' own."""
    limit: int = 100
    """Documents per task (the same first ones every time, so evaluations compare)."""
    data_dir: str = ""
    """Directory holding eval/ and wikipedia/ for the tasks; "" = $LLAMA_DATA_DIR (or ../shared/data)."""
    include_path: list[str] = field(default_factory=list)
    """Folders of your own lm-eval task YAMLs."""
    tokenizer: str = ""
    """Tokenizer file for the tasks' text; "" = data.tokenizer, else the one the data manifest names."""
    perplexity_data: str = ""
    """Held-out text for perplexity (a text/JSONL file, .bin/.idx shards or a prepare directory); "" = none."""
    perplexity_split: str = "none"
    """Text files: one document ("none"), one per line ("lines") or per WikiText article ("wikitext-articles")."""
    perplexity_docs: int = 50
    """The first N documents of perplexity_data."""
    batch_size: int = 16
    """Sequences per forward during evaluation."""
    hook: str = "evaluation.in_loop:LoopEvaluator"
    """``module:callable(cfg=, topology=)`` that runs the evaluation; train/ names it instead of importing it,
    because evaluation/ imports train/ (see train/hooks.py)."""


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "train": TrainSection, "optim": OptimSection,
    "parallel": ParallelSection, "zero": ZeroSection, "checkpoint": CheckpointSection,
    "logging": LoggingSection, "run": RunSection, "eval": LoopEvalSection,
}


def _llama_field_types() -> dict[str, Any]:
    from model.config import LlamaConfig

    return typing.get_type_hints(LlamaConfig)


@dataclass(frozen=True)
class EngineConfig:
    """What a training engine reads (``train.engine.TrainEngine``, ``train.reference.ReferenceEngine``): the
    parallel layout, ZeRO, the optimizer, precision, seed and batch sizes; no data paths, schedule or logging.
    ``RunConfig.engine_config()`` gives pretraining's; PPO builds one per role (``PPOConfig.engine_config``)."""

    global_batch_size: int
    """Sequences (or pairs, or rollouts) per optimizer step over all data-parallel ranks."""
    micro_batch_size: int
    """Items per forward/backward on one rank; accumulation = global / (micro x dp)."""
    seed: int = 1234
    """Seeds the weights (by parameter name, layout-independent)."""
    dtype: str = "fp32"
    """"fp32" or "bf16" (bf16 mixed precision with fp32 master weights)."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """Tensor / pipeline sizes and activation checkpointing."""
    zero: ZeroSection = field(default_factory=ZeroSection)
    """ZeRO stage and offload."""
    optim: OptimSection = field(default_factory=OptimSection)
    """AdamW betas, eps, weight decay and the gradient clip (the learning rate comes with each step)."""
    document_mask: bool = True
    """The document mask of packed sequences (the language-model objective and the pipeline stages)."""
    lora: Any = None
    """A ``model.lora.LoRASpec``: low-rank adapters on the model, its own weights frozen (None = train them all).
    The alignment stages set it from their ``[lora]`` section."""
    seq_len: int = 0
    """The fixed length of every training sequence (pretraining's data.seq_len); 0 = batches of varying length
    (the alignment stages), which sequence parallelism pads to a multiple of tp (the objective's
    ``sequence_keys``)."""
    offload_params: bool = False
    """ZeRO-3 parameter offload (DeepSpeed's ``offload_param``): each rank's partitions live in host memory and a
    module is gathered to the device only while it runs. Set for PPO's frozen roles by ``ppo.offload_frozen``."""

    def dp_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tp * self.parallel.pp * self.parallel.cp)

    def grad_accum(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size(world_size))


@dataclass(frozen=True)
class RunConfig(RootConfig):
    """A whole pretraining run: one frozen section per TOML table (the shared run sections)."""

    WHAT: ClassVar[str] = "run config"
    PRESETS: ClassVar[str] = "configs/pretrain/"

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    run: RunSection = field(default_factory=RunSection)
    eval: LoopEvalSection = field(default_factory=LoopEvalSection)

    @classmethod
    def coerce_table(cls, section: str, key: str, table: dict[str, Any], *, source: str) -> dict[str, Any]:
        if (section, key) == ("model", "overrides"):
            return _coerce_model_overrides(table, source=source)
        return table

    # ---- derived -----------------------------------------------------------------------------------
    def model_config(self) -> Any:
        """The ``LlamaConfig``: the registry entry with ``[model.overrides]`` applied."""
        from model.config import get_config

        try:
            cfg = get_config(self.model.name)
            return cfg.replace(**self.model.overrides) if self.model.overrides else cfg
        except ValueError as err:  # an unknown name or inconsistent shapes: the [model] table's fault
            raise ConfigError(f"[model] name={self.model.name!r} overrides={self.model.overrides}: {err}") from None

    def engine_config(self) -> EngineConfig:
        """The narrow config the training engine reads (layout, ZeRO, optimizer, precision, seed, batches)."""
        t = self.train
        return EngineConfig(global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size, seed=t.seed,
                            dtype=t.dtype, parallel=self.parallel, zero=self.zero, optim=self.optim,
                            document_mask=self.data.document_mask, seq_len=self.data.seq_len)

    def dp_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tp * self.parallel.pp * self.parallel.cp)

    def grad_accum(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.dp_size(world_size))

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    # ---- checks ------------------------------------------------------------------------------------
    def validate(self, *, world_size: int | None = None) -> RunConfig:
        """Raise ``ConfigError`` quoting the offending value and how to fix it. Returns self."""
        t, d = self.train, self.data
        model = self.model_config()
        _check(t.steps > 0, f"train.steps={t.steps}: must be positive")
        _check(d.seq_len <= model.max_seq_len,
               f"data.seq_len={d.seq_len} exceeds model {model.name!r} max_seq_len={model.max_seq_len}; "
               "lower data.seq_len or set model.overrides.max_seq_len")
        _check(d.seq_len > 0, f"data.seq_len={d.seq_len}: must be positive")
        _check(d.synthetic_document_length >= 0,
               f"data.synthetic_document_length={d.synthetic_document_length}: must be >= 0 (0 = 4-47 tokens)")
        _check(d.seq_len % (2 * max(self.parallel.cp, 1)) == 0,
               f"data.seq_len={d.seq_len} is not divisible by 2 x parallel.cp = {2 * self.parallel.cp}: context "
               "parallelism cuts every sequence into 2 x cp equal chunks; choose a multiple of it")
        _check(self.parallel.sequence_parallel is not True
               or d.seq_len % (self.parallel.tp * self.parallel.cp) == 0,
               f"data.seq_len={d.seq_len} is not divisible by parallel.tp x cp = {self.parallel.tp * self.parallel.cp}:"
               " sequence parallelism splits each rank's sequence (its CP share) over the TP ranks")
        _check(d.synthetic or d.path, "data.path is empty and data.synthetic=false: point --data.path at a "
               "`python -m data_pipeline prepare` output directory or pass --data.synthetic=true")
        self._validate_eval()
        return self.validate_shared(model, world_size=world_size)

    def _validate_eval(self) -> None:
        """``[eval]``'s own values; task names and files are checked by the evaluator, also before training."""
        e = self.eval
        _check(e.every >= 0, f"eval.every={e.every}: must be >= 0 (0 = off)")
        if not e.every:
            return
        _check(bool(e.tasks) or bool(e.perplexity_data),
               f"eval.every={e.every} with no eval.tasks and no eval.perplexity_data: give at least one")
        _check(e.limit > 0 and e.batch_size > 0 and e.perplexity_docs > 0,
               f"eval.limit={e.limit}, batch_size={e.batch_size}, perplexity_docs={e.perplexity_docs}: positive")
        _check(e.perplexity_split in ("none", "lines", "wikitext-articles"),
               f"eval.perplexity_split={e.perplexity_split!r}: use none, lines or wikitext-articles")
        _check(self.parallel.pp == 1,
               f"eval.every={e.every} with parallel.pp={self.parallel.pp}: in-loop evaluation runs the model at "
               "pipeline size 1 (tensor and data parallel are fine); set eval.every=0 or evaluate the exported "
               "checkpoint with `python -m evaluation run`")
        _check(self.zero.stage < 3,
               f"eval.every={e.every} with zero.stage=3: in-loop evaluation reads the weights whole on each rank "
               "(ZeRO 1/2); use zero.stage 1 or 2, or evaluate the saved checkpoint with `python -m evaluation run`")
        _check(":" in e.hook, f"eval.hook={e.hook!r}: give module:callable")

    def validate_shared(self, model: Any, *, world_size: int | None = None) -> RunConfig:
        """The checks of the sections every stage reads (batch, optimizer, layout, logging, resume)."""
        t, o = self.train, self.optim
        _check(t.dtype in ("fp32", "bf16"), f"train.dtype={t.dtype!r}: use \"fp32\" or \"bf16\"")
        _check(t.micro_batch_size > 0 and t.global_batch_size > 0,
               f"train.global_batch_size={t.global_batch_size}, micro_batch_size={t.micro_batch_size}: positive")
        _check(t.global_batch_size % t.micro_batch_size == 0,
               f"train.global_batch_size={t.global_batch_size} is not a multiple of "
               f"train.micro_batch_size={t.micro_batch_size}; change one of them")
        _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
        _check(o.lr > 0, f"optim.lr={o.lr}: must be positive")
        _check(0 <= o.warmup_steps, f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
        _check(0 < o.beta1 < 1 and 0 < o.beta2 < 1, f"optim.beta1={o.beta1}, beta2={o.beta2}: must be in (0, 1)")
        _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 = off)")
        _check(self.zero.stage in (1, 2, 3),
               f"zero.stage={self.zero.stage}: use 1, 2 or 3 (stage 1 already shards optimizer states at no "
               "extra communication over plain data parallelism)")
        _check(not (self.parallel.pp > 1 and self.zero.stage > 1),
               f"zero.stage={self.zero.stage} with parallel.pp={self.parallel.pp}: DeepSpeed allows only ZeRO 0/1 "
               "with pipeline parallelism (it refuses to partition gradients across pipeline stages); set "
               "--zero.stage=1")
        _check(self.parallel.tp >= 1 and self.parallel.pp >= 1 and self.parallel.cp >= 1,
               f"parallel.tp={self.parallel.tp}, pp={self.parallel.pp}, cp={self.parallel.cp}: must be >= 1")
        _check(self.parallel.sequence_parallel is not True or self.parallel.tp > 1,
               "parallel.sequence_parallel=true with parallel.tp=1: sequence parallelism splits the norm and residual "
               "activations over the tensor-parallel ranks; set parallel.tp > 1 or drop the flag")
        self._validate_layout(model)
        _check(self.checkpoint.keep_last >= 1, f"checkpoint.keep_last={self.checkpoint.keep_last}: must be >= 1")
        _check(t.max_consecutive_nonfinite >= 1,
               f"train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}: must be >= 1")
        _check(self.logging.wandb_mode in ("", "online", "offline", "disabled"),
               f"logging.wandb_mode={self.logging.wandb_mode!r}: use \"\", \"online\", \"offline\" or \"disabled\"")
        self._validate_device()
        _check(self.run.resume in ("none", "auto", "auto-or-fresh") or Path(self.run.resume).exists(),
               f"run.resume={self.run.resume!r}: use \"none\", \"auto\", \"auto-or-fresh\" or an existing "
               "checkpoint directory")
        if world_size is not None:
            mp = self.parallel.tp * self.parallel.pp * self.parallel.cp
            _check(world_size % mp == 0,
                   f"world size {world_size} is not a multiple of tp x pp x cp = {self.parallel.tp} x "
                   f"{self.parallel.pp} x {self.parallel.cp} = {mp}; launch a multiple of {mp} processes")
            dp = world_size // mp
            _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                   f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x dp = "
                   f"{t.micro_batch_size} x {dp}; use a global batch that is a multiple of "
                   f"{t.micro_batch_size * dp}")
        return self

    def _validate_device(self) -> None:
        """MFU's basis: a positive override, a known device key."""
        _check(self.logging.peak_tflops >= 0,
               f"logging.peak_tflops={self.logging.peak_tflops}: must be >= 0 (0 = from the device table)")
        if self.logging.gpu:
            from train.devices import DEVICES

            _check(self.logging.gpu.lower() in DEVICES,
                   f"logging.gpu={self.logging.gpu!r} is not in train/devices.py; known: {', '.join(DEVICES)} "
                   "(or set logging.peak_tflops)")

    def _validate_layout(self, model: Any) -> None:
        """Model shape vs the tensor/pipeline layout (before any process group exists)."""
        tp, pp = self.parallel.tp, self.parallel.pp
        _check(model.n_heads % tp == 0,
               f"parallel.tp={tp} does not divide n_heads={model.n_heads} of {model.name!r}; pick a divisor of "
               f"{model.n_heads}")
        _check(model.kv_heads % tp == 0 or tp % model.kv_heads == 0,
               f"parallel.tp={tp} vs n_kv_heads={model.kv_heads} of {model.name!r}: kv heads are split when tp "
               f"divides them and replicated when tp is a multiple of them; pick tp accordingly")
        _check(model.vocab_size % tp == 0,
               f"vocab_size={model.vocab_size} is not divisible by parallel.tp={tp} (vocab-parallel embedding "
               f"and head); set --model.overrides.vocab_size={-(-model.vocab_size // tp) * tp}")
        _check(pp <= model.n_layers + 2,
               f"parallel.pp={pp} exceeds the {model.n_layers + 2} pipeline entries of {model.name!r} "
               f"(embedding + {model.n_layers} blocks + head)")
        _check(not (pp > 1 and model.tie_embeddings),
               f"parallel.pp={pp} with tied embeddings ({model.name!r}): pipeline stages need an untied head; "
               "set --model.overrides.tie_embeddings=false or --parallel.pp=1")

def _check(ok: bool, message: str) -> None:
    check(ok, message, what="run config")


def _coerce_model_overrides(overrides: dict[str, Any], *, source: str) -> dict[str, Any]:
    types_ = _llama_field_types()
    bad = sorted(set(overrides) - set(types_) - {"name"})
    if bad:
        raise ConfigError(f"{source}: unknown [model.overrides] key(s) {bad}; valid: {sorted(types_)}")
    return {k: coerce(v, types_[k], where=f"{source}: model.overrides.{k}") for k, v in overrides.items()}


