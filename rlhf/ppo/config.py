"""The typed configuration of a PPO run (Llama 2 sec. 3.2.3 defaults), TOML presets plus overrides.

    from rlhf.ppo.config import PPOConfig
    cfg = PPOConfig.from_toml("configs/rlhf/ppo_tiny.toml", ["--ppo.iterations=5", "--run.dir=runs/ppo"])
    cfg.validate(world_size=2)            # ValueError quoting the bad value and the fix
    cfg.engine_run_config(role="policy")  # the train.config.RunConfig the DeepSpeed engine of one role reads

Defaults are the paper's: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient clip 1.0, constant LR 1e-6,
512 prompts per iteration in minibatches of 64 with one gradient step per minibatch, clip 0.2, the combined
reward with the 0.15 safety threshold, and the KL coefficient by size (``beta = -1``: 0.01 up to 13B, 0.005
for 34B/70B; ``default_beta``). Presets live in ``configs/rlhf/ppo*.toml``; the schema is the dataclasses
below (one docstring per field); an unknown section or key is an error listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.config import RunConfig, coerce, parse_overrides

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REWARD_KINDS = ("llama2", "single")
GATHER_MODES = ("once", "per_token")
KL_PENALTIES = ("k1", "k2", "k3")


@dataclass(frozen=True)
class PolicySection:
    model: str = "debug_tiny"
    """Registry name of the architecture (``model/config.py``)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """``LlamaConfig`` fields replaced on top of the registry entry (e.g. ``vocab_size`` of a tokenizer)."""
    init: str = ""
    """SFT / rejection-sampling checkpoint (native or HF directory, or its run directory; ``{data_dir}``
    expands to the shared data); "" = seeded random init (tests only). The reference starts from the same."""


@dataclass(frozen=True)
class ValueSection:
    init: str = "policy"
    """"policy" (the policy's initial backbone + a zero scalar head), "helpful_rm" (Llama 2: the helpfulness
    reward model's weights, when ``reward.helpful`` is a checkpoint), a checkpoint directory, or "" (seeded)."""


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


@dataclass(frozen=True)
class DataSection:
    prompts: str = "synthetic"
    """"synthetic" (random token prompts), an HH-RLHF directory (helpful-base/ and harmless-base/; harmless
    prompts are safety-flagged), or a JSONL file of dialogues / preference pairs (``is_safety`` per record)."""
    tokenizer: str = ""
    """tokenizer.model for real prompts and keyword rewards."""
    template: str = "llama2"
    """Chat format of the prompts: "llama2" or "llama3"."""
    max_prompt_tokens: int = 128
    """Longer prompts are dropped (and counted); + rollout.max_new_tokens must fit the model context."""
    heldout_prompts: int = 64
    """Prompts held out for evaluation and early stopping (a deterministic split by prompt hash)."""
    synthetic_prompts: int = 1024
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
class PPOSection:
    iterations: int = 200
    """PPO iterations (Llama 2: 200-400, with early stopping on held-out prompts)."""
    prompts_per_iteration: int = 512
    """Prompts (one rollout each) per iteration over all data-parallel ranks."""
    minibatch_size: int = 64
    """Rollouts per gradient step (one step per minibatch)."""
    micro_batch_size: int = 8
    """Rollouts per forward/backward on one rank."""
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


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-6
    """Policy learning rate (constant)."""
    value_lr: float = -1.0
    """Value-model learning rate; -1 = lr."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-5
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""


@dataclass(frozen=True)
class ParallelSection:
    tp: int = 1
    """Tensor-parallel size of every role."""
    zero_stage: int = 1
    """ZeRO stage of the trained roles (policy, value)."""
    frozen_zero_stage: int = -1
    """ZeRO stage of the frozen roles (reference, reward models); -1 = zero_stage."""
    dtype: str = "fp32"
    """"fp32" or "bf16"."""
    activation_checkpoint_every: int = 0
    """Activation checkpointing of the trained roles, segments of N blocks; 0 = off."""
    collective_timeout_s: int = 600
    """Seconds before a hung collective fails."""


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
    """Alarm when the batch reward stays this many iterations below its best by more than reward_drop."""
    reward_drop: float = 0.5
    """Drop of the mean LOGIT(Rc) from its best that counts (nats)."""
    max_consecutive_nonfinite: int = 3
    """Abort after this many iterations in a row with NaN/Inf rewards, log-probs or losses (each is skipped)."""
    stop_on_alarm: bool = False
    """Stop the run (keeping the best held-out policy) at the first alarm instead of only logging it."""


@dataclass(frozen=True)
class RunSection:
    dir: str = "runs/ppo"
    """Run directory: metrics.jsonl, ppo_config.toml, best_policy/, final_policy/, final_value/."""
    seed: int = 1234
    """Seeds the weights of untrained roles, the prompt order and every rollout."""


@dataclass(frozen=True)
class LoggingSection:
    wandb: bool = False
    """Log to Weights & Biases (offline unless logged in)."""
    wandb_project: str = "llama-stack"
    """wandb project."""
    wandb_mode: str = ""
    """"" = auto, or "online" / "offline" / "disabled"."""


SECTIONS: dict[str, type] = {
    "policy": PolicySection, "value": ValueSection, "reward": RewardSection, "data": DataSection,
    "rollout": RolloutSection, "ppo": PPOSection, "optim": OptimSection, "parallel": ParallelSection,
    "eval": EvalSection, "guards": GuardSection, "run": RunSection, "logging": LoggingSection,
}


def default_beta(n_params: int) -> float:
    """Llama 2's KL coefficient: 0.01 for 7B and 13B, 0.005 for 34B and 70B (threshold 20B parameters)."""
    return 0.005 if n_params > 20e9 else 0.01


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid PPO config: {message}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


@dataclass(frozen=True)
class PPOConfig:
    """A whole PPO run: one frozen section per TOML table."""

    policy: PolicySection = field(default_factory=PolicySection)
    value: ValueSection = field(default_factory=ValueSection)
    reward: RewardSection = field(default_factory=RewardSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    eval: EvalSection = field(default_factory=EvalSection)
    guards: GuardSection = field(default_factory=GuardSection)
    run: RunSection = field(default_factory=RunSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> PPOConfig:
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            table = data.get(name, {})
            hints = typing.get_type_hints(section_cls)
            bad = sorted(set(table) - set(hints))
            if bad:
                raise ValueError(f"{source}: unknown key(s) {bad} in [{name}]; valid keys: {sorted(hints)}")
            values = {k: coerce(v, hints[k], where=f"{source}: {name}.{k}") for k, v in table.items()}
            if name == "policy" and values.get("overrides"):  # LlamaConfig fields, typed like the pretraining config
                values["overrides"] = RunConfig.from_dict({"model": {"overrides": values["overrides"]}},
                                                          source=source).model.overrides
            sections[name] = section_cls(**values)
        return cls(**sections)

    @classmethod
    def from_toml(cls, path: str | Path | None, overrides: list[str] | None = None) -> PPOConfig:
        """Read a preset (``None``: the defaults) and apply ``--section.key=value`` overrides."""
        data: dict[str, Any] = {}
        source = "<defaults>"
        if path is not None:
            source = str(path)
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ValueError(f"config file {path} does not exist; presets are in configs/rlhf/") from None
        for key, value in parse_overrides(overrides or []):
            parts = key.split(".")
            if parts[0] not in SECTIONS:
                raise ValueError(f"override --{key}: unknown section {parts[0]!r}; valid: {sorted(SECTIONS)}")
            if parts[:2] == ["policy", "overrides"] and len(parts) == 3:
                data.setdefault("policy", {}).setdefault("overrides", {})[parts[2]] = value
                continue
            if len(parts) != 2:
                raise ValueError(f"override --{key}: expected --section.key=value")
            data.setdefault(parts[0], {})[parts[1]] = value
        return cls.from_dict(data, source=source + (" + overrides" if overrides else ""))

    def to_toml(self) -> str:
        lines: list[str] = []
        for name, table in dataclasses.asdict(self).items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
            lines.append("")
        return "\n".join(lines)

    # ---- derived -----------------------------------------------------------------------------------
    def model_config(self) -> Any:
        """The policy's ``LlamaConfig`` (registry entry + ``[policy.overrides]``); every role shares it."""
        return self.engine_run_config(role="frozen").model_config()

    @property
    def beta(self) -> float:
        return self.reward.beta if self.reward.beta >= 0 else default_beta(self.model_config().num_params())

    @property
    def frozen_stage(self) -> int:
        return self.parallel.frozen_zero_stage if self.parallel.frozen_zero_stage > 0 else self.parallel.zero_stage

    def engine_run_config(self, *, role: str) -> RunConfig:
        """The engine's config for one role: "policy" / "value" train, "frozen" only scores."""
        p, o = self.parallel, self.optim
        lr = o.value_lr if (role == "value" and o.value_lr > 0) else o.lr
        stage = self.frozen_stage if role == "frozen" else p.zero_stage
        return RunConfig.from_dict({
            "model": {"name": self.policy.model, "overrides": dict(self.policy.overrides)},
            "data": {"synthetic": True, "seq_len": 8},
            "train": {"global_batch_size": self.ppo.minibatch_size, "micro_batch_size": self.ppo.micro_batch_size,
                      "seed": self.run.seed, "dtype": p.dtype, "collective_timeout_s": p.collective_timeout_s},
            "optim": {"lr": lr, "warmup_steps": 0, "min_lr_ratio": 1.0, "beta1": o.beta1, "beta2": o.beta2,
                      "eps": o.eps, "weight_decay": o.weight_decay, "grad_clip": o.grad_clip},
            "parallel": {"tp": p.tp, "activation_checkpoint_every": p.activation_checkpoint_every
                         if role != "frozen" else 0},
            "zero": {"stage": stage},
            "logging": {"wandb": False},
        }, source=f"ppo engine config ({role})")

    def validate(self, *, world_size: int | None = None) -> PPOConfig:
        r, ro, p, d = self.reward, self.rollout, self.ppo, self.data
        _check(r.kind in REWARD_KINDS, f"reward.kind={r.kind!r}: use one of {REWARD_KINDS}")
        _check(bool(r.helpful), "reward.helpful is empty: give a reward-model checkpoint, target_tokens:IDS, "
               "keyword:WORD or module:callable")
        _check(r.kl_penalty in KL_PENALTIES, f"reward.kl_penalty={r.kl_penalty!r}: use one of {KL_PENALTIES}")
        _check(0 < r.safety_threshold < 1, f"reward.safety_threshold={r.safety_threshold}: must be in (0, 1)")
        _check(ro.gather in GATHER_MODES, f"rollout.gather={ro.gather!r}: use one of {GATHER_MODES}")
        _check(ro.temperature > 0, f"rollout.temperature={ro.temperature}: PPO samples, use > 0")
        _check(ro.max_new_tokens > 0, f"rollout.max_new_tokens={ro.max_new_tokens}: must be positive")
        _check(p.prompts_per_iteration % p.minibatch_size == 0,
               f"ppo.prompts_per_iteration={p.prompts_per_iteration} is not a multiple of ppo.minibatch_size="
               f"{p.minibatch_size}")
        _check(0 < p.clip < 1 and p.value_clip > 0, f"ppo.clip={p.clip}, value_clip={p.value_clip}: clip in (0, 1)")
        _check(0 <= p.gamma <= 1 and 0 <= p.lam <= 1, f"ppo.gamma={p.gamma}, lam={p.lam}: must be in [0, 1]")
        _check(self.optim.lr > 0, f"optim.lr={self.optim.lr}: must be positive")
        _check(self.parallel.dtype in ("fp32", "bf16"), f"parallel.dtype={self.parallel.dtype!r}: fp32 or bf16")
        _check(self.parallel.zero_stage in (1, 2, 3) and self.frozen_stage in (1, 2, 3),
               f"parallel.zero_stage={self.parallel.zero_stage}, frozen_zero_stage="
               f"{self.parallel.frozen_zero_stage}: use 1, 2 or 3")
        _check(d.heldout_prompts >= 2, f"data.heldout_prompts={d.heldout_prompts}: need >= 2 for early stopping")
        _check(ro.max_new_tokens + d.max_prompt_tokens <= self.model_config().max_seq_len,
               f"data.max_prompt_tokens={d.max_prompt_tokens} + rollout.max_new_tokens={ro.max_new_tokens} exceeds "
               f"max_seq_len={self.model_config().max_seq_len} of {self.policy.model!r}")
        if world_size is not None:
            _check(world_size % self.parallel.tp == 0,
                   f"world size {world_size} is not a multiple of parallel.tp={self.parallel.tp}")
            dp = world_size // self.parallel.tp
            _check(p.minibatch_size % (p.micro_batch_size * dp) == 0,
                   f"ppo.minibatch_size={p.minibatch_size} is not a multiple of micro_batch_size x dp = "
                   f"{p.micro_batch_size} x {dp}; every rank takes an equal share of each minibatch")
            _check(d.heldout_prompts % dp == 0,
                   f"data.heldout_prompts={d.heldout_prompts} is not a multiple of the data-parallel size {dp}")
        return self
