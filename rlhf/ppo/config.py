"""The typed configuration of a PPO run (Llama 2 sec. 3.2.3 defaults): the shared run sections plus PPO's own.

    from rlhf.ppo.config import PPOConfig
    cfg = PPOConfig.from_toml("configs/rlhf/ppo_tiny.toml", ["--ppo.iterations=5", "--run.dir=runs/ppo"])
    cfg.validate(world_size=2)            # ConfigError quoting the bad value and the fix
    cfg.engine_config(role="policy")  # the EngineConfig the training engine of one role reads

Like every stage, PPO reads the run sections of ``train.config.RunConfig`` with their usual meaning (``[model]``
the policy's architecture, ``[data] tokenizer``, ``[train]`` seed / dtype / batch sizes, ``[optim]``,
``[parallel]``, ``[zero]``, ``[logging]``, ``[run] dir``) and adds its own sections: ``[ppo]`` (the algorithm and
its checkpoints), ``[reward]``, ``[prompts]``, ``[rollout]``, ``[eval]`` and ``[guards]``. One PPO minibatch is
one optimizer step, so ``train.global_batch_size`` is the rollouts per gradient step and
``train.micro_batch_size`` the rollouts per forward/backward on one rank. Keys of the run sections that PPO
does not read are listed in ``UNUSED`` (``--help`` marks them; a changed value is refused, not ignored).

Defaults are the paper's: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient clip 1.0, constant LR 1e-6,
512 prompts per iteration in minibatches of 64 with one gradient step per minibatch, clip 0.2, the combined
reward with the 0.15 safety threshold, and the KL coefficient by size (``beta = -1``: 0.01 up to 13B, 0.005
for 34B/70B; ``default_beta``). Presets live in ``configs/rlhf/ppo*.toml``; ``python -m rlhf.ppo --help`` lists
every key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from train.config import (
    CheckpointSection,
    EngineConfig,
    LoggingSection,
    OptimSection,
    RunConfig,
    RunSection,
    TrainSection,
    check,
)

REWARD_KINDS = ("llama2", "single")
GATHER_MODES = ("once", "per_token")
KL_PENALTIES = ("k1", "k2", "k3")


@dataclass(frozen=True)
class PPOSection:
    init: str = ""
    """SFT / rejection-sampling checkpoint the policy starts from (native or HF directory, or its run directory;
    ``{data_dir}`` expands to the shared data); "" = seeded random init (tests only). The reference starts from
    the same."""
    value_init: str = "policy"
    """"policy" (the policy's initial backbone + a zero scalar head), "helpful_rm" (Llama 2: the helpfulness
    reward model's weights, when ``reward.helpful`` is a checkpoint), a checkpoint directory, or "" (seeded)."""
    iterations: int = 200
    """PPO iterations (Llama 2: 200-400, with early stopping on held-out prompts)."""
    prompts_per_iteration: int = 512
    """Prompts (one rollout each) per iteration over all data-parallel ranks; a multiple of
    ``train.global_batch_size`` (the rollouts of one gradient step)."""
    epochs: int = 1
    """Passes over the iteration's minibatches."""
    clip: float = 0.2
    """Policy ratio clip."""
    value_clip: float = 0.2
    """Value clip (absolute, in whitened reward units)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages over the iteration's response tokens (all ranks)."""
    value_lr: float = -1.0
    """Value-model learning rate; -1 = ``optim.lr``."""
    frozen_zero_stage: int = -1
    """ZeRO stage of the frozen roles (reference, reward models); -1 = ``zero.stage`` (that of the trained roles)."""
    offload_frozen: bool = False
    """Hold the frozen roles (reference, reward models) in host memory: DeepSpeed's ZeRO-3 parameter offload, so
    their partitions stay in CPU RAM and each module is gathered to the device only while it scores (needs
    ``frozen_zero_stage = 3``, or ``zero.stage = 3``). Trades PCIe traffic in the scoring phase for their whole
    weights' device memory in every phase."""


@dataclass(frozen=True)
class RewardSection:
    kind: str = "llama2"
    """"llama2": ``Rc = Rs if is_safety(p) or Rs < threshold else Rh``, then WHITEN(LOGIT(Rc)); "single": the
    helpfulness scorer alone, LOGIT then WHITEN."""
    helpful: str = ""
    """Helpfulness scorer: a reward-model directory (``python -m rlhf.reward`` output), ``target_tokens:ID,ID,...``,
    ``keyword:WORD`` (needs data.tokenizer), or ``module:callable`` returning a scorer."""
    safety: str = ""
    """Safety scorer, same forms as ``helpful``; "" with kind=llama2 means a constant 1.0 (no gating)."""
    safety_threshold: float = 0.15
    """Llama 2's gate: a safety score below this uses the safety reward on any prompt."""
    whiten: bool = True
    """WHITEN over the iteration's batch (all data-parallel ranks)."""
    beta: float = -1.0
    """KL penalty coefficient; -1 = by model size (0.01 up to 13B, 0.005 for 34B/70B)."""
    kl_penalty: str = "k1"
    """Per-token penalty estimator: "k1" (log-ratio; its sum is the sequence log-ratio, as in InstructGPT and
    Llama 2), "k2" or "k3" (>= 0 per token, biased as a penalty). See rlhf/losses.py kl_estimate."""
    allow_weak_rm: bool = False
    """Use a reward model whose held-out accuracy (its heldout_eval.json) is at or below chance or below the
    length baseline; by default PPO refuses it (``rlhf.reward.gate``)."""


@dataclass(frozen=True)
class PromptsSection:
    source: str = "synthetic"
    """"synthetic" (random token prompts), an HH-RLHF directory (helpful-base/ and harmless-base/; harmless
    prompts are safety-flagged), or a JSONL file of dialogues / preference pairs (``is_safety`` per record)."""
    template: str = "llama2"
    """Chat format of the prompts: "llama2", "llama3" or "llama3_1"."""
    max_tokens: int = 128
    """Longer prompts are dropped (and counted); + rollout.max_new_tokens must fit the model context."""
    heldout: int = 64
    """Prompts held out for evaluation and early stopping (a deterministic split by prompt hash)."""
    synthetic_count: int = 1024
    """Number of synthetic prompts."""
    synthetic_min_len: int = 4
    """Shortest synthetic prompt (tokens, BOS included)."""
    synthetic_max_len: int = 12
    """Longest synthetic prompt."""
    synthetic_safety_fraction: float = 0.25
    """Share of synthetic prompts flagged as safety prompts."""


@dataclass(frozen=True)
class RolloutSection:
    max_new_tokens: int = 128
    """Longest sampled answer (truncated answers get no end token)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for PPO are taken at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = plain sampling, the on-policy choice)."""
    batch_size: int = 64
    """Prompts per generate() call on one rank."""
    gather: str = "once"
    """ZeRO-3 generation: "once" gathers the policy's full weights once per rollout (Llama 2), "per_token"
    lets ZeRO-3 gather each layer at every token (the slow baseline; benchmarks/bench_rollout.py)."""


@dataclass(frozen=True)
class EvalSection:
    every: int = 10
    """Held-out evaluation every N iterations (and before the first and after the last); 0 = never."""
    patience: int = 5
    """Early stop after this many evaluations without a held-out reward gain of more than min_delta; 0 = off."""
    min_delta: float = 0.0
    """Smallest held-out reward gain that counts as an improvement."""
    temperature: float = -1.0
    """Sampling temperature on held-out prompts (fixed seeds, so evaluations compare); -1 = rollout's."""


@dataclass(frozen=True)
class GuardSection:
    kl_max: float = 25.0
    """Alarm when the mean per-sequence KL to the reference exceeds this (nats)."""
    kl_rising_window: int = 8
    """Alarm when the KL rose at each of this many iterations in a row."""
    negative_kl_window: int = 3
    """Alarm when the mean k1 estimate is below -0.01 nats for this many iterations (samples not from pi)."""
    reward_drop_window: int = 5
    """Alarm when the held-out LOGIT(Rc) stays this many evaluations (eval.every) below its best by more than
    reward_drop."""
    reward_drop: float = 0.5
    """Drop of the held-out mean LOGIT(Rc) from its best that counts (nats)."""
    max_consecutive_nonfinite: int = 3
    """Abort after this many iterations in a row with NaN/Inf rewards, log-probs or losses (each is skipped)."""
    stop_on_alarm: bool = False
    """Stop the run (keeping the best held-out policy) at the first alarm instead of only logging it."""


def default_beta(n_params: int) -> float:
    """Llama 2's KL coefficient: 0.01 for 7B and 13B, 0.005 for 34B and 70B (threshold 20B parameters)."""
    return 0.005 if n_params > 20e9 else 0.01


def _check(ok: bool, message: str) -> None:
    check(ok, message, what="PPO config")


@dataclass(frozen=True)
class PPOConfig(RunConfig):
    """A whole PPO run: the run sections (PPO's defaults) plus one frozen section per PPO table."""

    WHAT: typing.ClassVar[str] = "PPO config"
    PRESETS: typing.ClassVar[str] = "configs/rlhf/"
    MOVED: typing.ClassVar[dict[str, str]] = {
        "policy.model": "model.name", "policy.overrides": "model.overrides", "policy.init": "ppo.init",
        "value.init": "ppo.value_init", "data.prompts": "prompts.source", "data.template": "prompts.template",
        "data.max_prompt_tokens": "prompts.max_tokens", "data.heldout_prompts": "prompts.heldout",
        "data.synthetic_prompts": "prompts.synthetic_count", "data.synthetic_min_len": "prompts.synthetic_min_len",
        "data.synthetic_max_len": "prompts.synthetic_max_len",
        "data.synthetic_safety_fraction": "prompts.synthetic_safety_fraction",
        "ppo.minibatch_size": "train.global_batch_size", "ppo.micro_batch_size": "train.micro_batch_size",
        "optim.value_lr": "ppo.value_lr", "parallel.zero_stage": "zero.stage",
        "parallel.frozen_zero_stage": "ppo.frozen_zero_stage", "parallel.dtype": "train.dtype",
        "parallel.collective_timeout_s": "train.collective_timeout_s", "run.seed": "train.seed",
    }
    UNUSED: typing.ClassVar[tuple[str, ...]] = (
        "data.path", "data.synthetic", "data.seq_len", "data.split", "data.document_mask", "train.steps",
        "train.eval_every", "train.eval_batches", "train.log_every", "train.max_consecutive_nonfinite",
        "train.spike_factor", "optim.min_lr_ratio", "optim.min_lr", "optim.warmup_steps", "parallel.pp",
        "zero.offload", "logging.tensorboard", "logging.peak_tflops", "logging.gpu")
    DOCS: typing.ClassVar[dict[str, str]] = {
        "model.name": "Registry name of the policy's architecture (``model/config.py``); every role shares it.",
        "train.global_batch_size": "Rollouts per gradient step (one PPO minibatch) over all data-parallel ranks.",
        "train.micro_batch_size": "Rollouts per forward/backward on one rank.",
        "train.seed": "Seeds the weights of untrained roles, the prompt order and every rollout.",
        "optim.lr": "Policy learning rate (constant: PPO has no warmup or decay).",
        "parallel.activation_checkpoint_every": "Activation checkpointing of the trained roles (policy, value), "
                                                "segments of N blocks; 0 = off.",
        "zero.stage": "ZeRO stage of the trained roles (policy, value); ppo.frozen_zero_stage sets the frozen ones.",
        "run.dir": "Run directory: metrics.jsonl, ppo_config.toml, checkpoints/, best_policy/, final_policy/, "
                   "final_value/.",
        "checkpoint.every": "Checkpoint every N PPO iterations (and on SIGTERM/SIGUSR1 and at the end); 0 = only "
                            "those. Policy and value shards with their optimizer states, guards, early stopping.",
        "run.resume": "\"auto\": continue from the newest intact checkpoint in run.dir (none yet: start fresh), at "
                      "any data-parallel size; \"auto-or-fresh\", \"none\" or a checkpoint directory.",
    }

    train: TrainSection = field(default_factory=lambda: TrainSection(global_batch_size=64, micro_batch_size=8))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, min_lr_ratio=1.0, warmup_steps=0))
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(wandb=False))
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/ppo"))
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=10))
    ppo: PPOSection = field(default_factory=PPOSection)
    reward: RewardSection = field(default_factory=RewardSection)
    prompts: PromptsSection = field(default_factory=PromptsSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    eval: EvalSection = field(default_factory=EvalSection)
    guards: GuardSection = field(default_factory=GuardSection)

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        return self.reward.beta if self.reward.beta >= 0 else default_beta(self.model_config().num_params())

    @property
    def frozen_stage(self) -> int:
        return self.ppo.frozen_zero_stage if self.ppo.frozen_zero_stage > 0 else self.zero.stage

    def engine_config(self, *, role: str = "policy") -> EngineConfig:
        """The engine's config for one role: "policy" / "value" train, "frozen" only scores."""
        lr = self.ppo.value_lr if (role == "value" and self.ppo.value_lr > 0) else self.optim.lr
        frozen = role == "frozen"
        base = super().engine_config()
        return dataclasses.replace(
            base, optim=dataclasses.replace(self.optim, lr=lr),
            zero=dataclasses.replace(self.zero, stage=self.frozen_stage if frozen else self.zero.stage),
            offload_params=frozen and self.ppo.offload_frozen,
            parallel=dataclasses.replace(self.parallel, activation_checkpoint_every=0 if frozen
                                         else self.parallel.activation_checkpoint_every))

    def model_config(self) -> Any:
        """The shape of ``ppo.init`` (its own config; ``[model.overrides]`` on top), else ``[model] name``."""
        from rlhf.config import init_model_config

        return init_model_config(self, self.ppo.init, key="ppo.init")

    def validate(self, *, world_size: int | None = None) -> PPOConfig:
        r, ro, p, d, t = self.reward, self.rollout, self.ppo, self.prompts, self.train
        _check(r.kind in REWARD_KINDS, f"reward.kind={r.kind!r}: use one of {REWARD_KINDS}")
        _check(bool(r.helpful), "reward.helpful is empty: give a reward-model checkpoint, target_tokens:IDS, "
               "keyword:WORD or module:callable")
        _check(r.kl_penalty in KL_PENALTIES, f"reward.kl_penalty={r.kl_penalty!r}: use one of {KL_PENALTIES}")
        _check(0 < r.safety_threshold < 1, f"reward.safety_threshold={r.safety_threshold}: must be in (0, 1)")
        _check(ro.gather in GATHER_MODES, f"rollout.gather={ro.gather!r}: use one of {GATHER_MODES}")
        _check(ro.temperature > 0, f"rollout.temperature={ro.temperature}: PPO samples, use > 0")
        _check(ro.max_new_tokens > 0, f"rollout.max_new_tokens={ro.max_new_tokens}: must be positive")
        _check(p.prompts_per_iteration % t.global_batch_size == 0,
               f"ppo.prompts_per_iteration={p.prompts_per_iteration} is not a multiple of train.global_batch_size="
               f"{t.global_batch_size} (the rollouts of one gradient step)")
        _check(0 < p.clip < 1 and p.value_clip > 0, f"ppo.clip={p.clip}, value_clip={p.value_clip}: clip in (0, 1)")
        _check(0 <= p.gamma <= 1 and 0 <= p.lam <= 1, f"ppo.gamma={p.gamma}, lam={p.lam}: must be in [0, 1]")
        _check(self.frozen_stage in (1, 2, 3),
               f"ppo.frozen_zero_stage={p.frozen_zero_stage}: use 1, 2 or 3 (or -1 = zero.stage)")
        _check(not p.offload_frozen or self.frozen_stage == 3,
               f"ppo.offload_frozen=true needs the frozen roles at ZeRO stage 3 (their partitions are what is held in "
               f"host memory), but they run stage {self.frozen_stage}: set --ppo.frozen_zero_stage=3")
        _check(d.template in ("llama2", "llama3", "llama3_1"),
               f"prompts.template={d.template!r}: use \"llama2\", \"llama3\" or \"llama3_1\"")
        _check(d.heldout >= 2, f"prompts.heldout={d.heldout}: need >= 2 for early stopping")
        model = self.model_config()
        _check(ro.max_new_tokens + d.max_tokens <= model.max_seq_len,
               f"prompts.max_tokens={d.max_tokens} + rollout.max_new_tokens={ro.max_new_tokens} exceeds "
               f"max_seq_len={model.max_seq_len} of {self.model.name!r}")
        self.check_unused()
        self.validate_shared(model, world_size=world_size)  # dtype, optimizer, ZeRO, layout, micro_batch_size x dp
        if world_size is not None:
            dp = self.dp_size(world_size)
            _check(d.heldout % dp == 0, f"prompts.heldout={d.heldout} is not a multiple of the data-parallel size {dp}")
        return self
