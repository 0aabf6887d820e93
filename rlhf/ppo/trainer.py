"""PPO with the Llama 2 combined reward (sec. 3.2.3): policy, frozen reference, value model and two reward models,
each under tensor parallelism x ZeRO, rollouts with the KV-cache generator.

    python -m rlhf.ppo --config configs/rlhf/ppo_tiny.toml --run.dir runs/ppo_tiny              # one process
    torchrun --standalone --nproc-per-node 2 -m rlhf.ppo --config configs/rlhf/ppo_tiny.toml \\
        --parallel.tp=2 --run.dir runs/ppo_tp2
    torchrun --standalone --nproc-per-node 2 -m rlhf.ppo --config configs/rlhf/ppo_tiny.toml \\
        --zero.stage=3 --rollout.gather=once --run.dir runs/ppo_zero3
    python -m rlhf.ppo --config configs/rlhf/ppo_tiny.toml --run.dir runs/ppo_tiny --resume auto  # continue
    python -m train.report runs/ppo_tiny                                                       # curves

One iteration (``PPOTrainer.iteration``)::

    prompts   = this rank's share of the iteration's prompts            (rlhf/ppo/prompts.py)
    samples   = sample answers with the policy                           (rlhf/ppo/rollout.py; ZeRO-3: one gather)
    logp, ref = log-probs of the answers under the policy and the reference; values from the value model
    R         = WHITEN(LOGIT(Rs if is_safety(p) or Rs < 0.15 else Rh))  (rlhf/ppo/rewards.py)
    r_t       = -beta * (logp_t - ref_t), plus R on the last answer token (rlhf/losses.py)
    A, G      = GAE(r, V; gamma, lam); A whitened over all ranks
    for each minibatch: one policy step (clipped surrogate), one value step (clipped value loss)

Every held-out evaluation samples the held-out prompts with fixed seeds; the best held-out policy is exported
to ``RUN_DIR/best_policy`` and the run stops early after ``eval.patience`` evaluations without a gain.
Guards (KL / reward trend alarms, non-finite iterations) are in ``rlhf/ppo/guards.py``.

Checkpoints (``rlhf/ppo/checkpoint.py``, through ``train/checkpointing.py``): every ``checkpoint.every``
iterations, at the end, and at the first iteration boundary after SIGTERM / SIGUSR1, then the process exits like
``python -m train``: 0 after SIGUSR1 (SLURM requeues), 143 after SIGTERM. ``--resume auto`` continues from the
newest intact checkpoint, at any data-parallel size; a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model import comm
from rlhf.export import export_policy, policy_meta
from rlhf.losses import gae, kl_estimate, kl_penalized_rewards, logit
from rlhf.paths import checkpoint_dir, resolve_path
from rlhf.ppo import rollout as ro
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.guards import EarlyStopping, NonFinitePPO, PPOGuards
from rlhf.ppo.metrics import PPOMetricsLogger
from rlhf.ppo.prompts import iteration_prompts, prompt_set, shard, split_heldout
from rlhf.ppo.rewards import (
    RewardModelScorer,
    RewardResult,
    RewardStage,
    build_scorer,
    global_masked_whiten,
)
from rlhf.ppo.roles import PolicyObjective, ValueObjective
from rlhf.reward.gate import check_reward_model
from rlhf.reward.model import RewardObjective
from rlhf.scalar_head import read_scalar_model, write_scalar_model, zero_head
from train.config_reader import ConfigError, add_config_arguments


@dataclass
class Experience:
    """One rank's rollouts with everything PPO needs, in answer space (one vector per sample)."""

    samples: list[ro.Sample]
    old_logp: list[Tensor]
    ref_logp: list[Tensor]
    values: list[Tensor]
    advantages: list[Tensor]
    returns: list[Tensor]
    reward: RewardResult


@dataclass
class PPOResult:
    run_dir: Path
    iterations: int
    reason: str
    """"completed", "early_stop", "alarm", "preempted:SIGUSR1" or "preempted:SIGTERM"."""
    best_iteration: int
    best_heldout: float
    history: list[dict[str, Any]] = field(default_factory=list)
    """This process's records (a resumed run's earlier ones are in metrics.jsonl)."""
    exit_code: int = 0
    """0, or after a pre-emption: 0 for SIGUSR1 (SLURM requeues), 143 for SIGTERM (train.preemption)."""
    start_iteration: int = 0
    """The checkpoint's iteration this process resumed from (0: fresh)."""


def _initial_weights(cfg: PPOConfig, model_cfg: Any) -> Any:
    """The policy's starting weights: the SFT checkpoint (a lazy reader: each rank reads its TP slices only), or
    the seeded init (identical on every rank; tests)."""
    if cfg.ppo.init:
        from model.checkpoints import open_checkpoint

        weights = open_checkpoint(checkpoint_dir(resolve_path(cfg.ppo.init)))
        ckpt_cfg = weights.cfg
        if ckpt_cfg.dim != model_cfg.dim or ckpt_cfg.n_layers != model_cfg.n_layers:
            raise ConfigError(f"ppo.init={cfg.ppo.init!r} is a {ckpt_cfg.name} (dim {ckpt_cfg.dim}, "
                              f"{ckpt_cfg.n_layers} layers) but model.name={cfg.model.name!r}; make them agree")
        return weights
    from model.llama import Llama, init_llama_weights
    from model.materialize import build_unfilled

    model = build_unfilled(lambda: Llama(model_cfg))  # nothing drawn: the seeded init writes every weight
    init_llama_weights(model, seed=cfg.train.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class PPOTrainer:
    """Builds the five roles and runs PPO iterations; every method is collective over all ranks."""

    def __init__(self, cfg: PPOConfig, *, topology: Any = None, reward_stage: RewardStage | None = None,
                 print_fn: Any = print) -> None:
        from train.engine import TrainEngine
        from train.topology import Topology

        self.topo = topology or Topology.initialize(tp=cfg.parallel.tp, timeout_s=cfg.train.collective_timeout_s)
        self.cfg = cfg.validate(world_size=self.topo.world_size)
        self.print = print_fn if self.topo.global_rank == 0 else (lambda *a, **k: None)
        self.model_cfg = cfg.model_config()
        self.tokenizer = None
        if cfg.data.tokenizer:
            from model.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(resolve_path(cfg.data.tokenizer))
        self.pad_id = self.tokenizer.pad_id if self.tokenizer else 0
        self.stop_ids = tuple(self.tokenizer.stop_ids) if self.tokenizer else (2,)
        self._engine_cls = TrainEngine
        self.train_prompts, self.heldout = self._prompts()  # before any engine: a bad prompt set costs nothing
        weights = _initial_weights(cfg, self.model_cfg)
        objective = PolicyObjective(clip=cfg.ppo.clip, temperature=cfg.rollout.temperature)
        self.policy = self._engine("policy", objective, self.model_cfg, weights)
        self.reference = self._engine("frozen", objective, self.model_cfg, weights)
        self.rewards = reward_stage or self._reward_stage()
        self.value = self._value_engine(weights)
        self.guards = PPOGuards(cfg.guards)
        self.stopper = EarlyStopping(patience=cfg.eval.patience, min_delta=cfg.eval.min_delta)

    # ---- construction ----------------------------------------------------------------------------------
    def _prompts(self) -> tuple[list[Any], list[Any]]:
        """``(train, held-out)`` prompts; ``RUN_DIR/data_report.json`` says what each file gave and skipped, also
        when too few prompts are left (the split refuses them)."""
        cfg, report = self.cfg, {"source": self.cfg.prompts.source}
        prompts = prompt_set(cfg.prompts, tokenizer=self.tokenizer, vocab_size=self.model_cfg.vocab_size,
                             seed=cfg.train.seed, print_fn=self.print, report=report)
        if self.topo.global_rank == 0:
            Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run.dir) / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
        return split_heldout(prompts, n=cfg.prompts.heldout)

    def _engine(self, role: str, objective: Any, model_cfg: Any, weights: dict[str, Tensor] | None) -> Any:
        # Frozen roles only score: no optimizer, no fp32 master weights (issue 16 item 2).
        engine = self._engine_cls(model_cfg=model_cfg, engine_cfg=self.cfg.engine_config(role=role),
                                  topology=self.topo, objective=objective, init_weights=weights,
                                  inference_only=role == "frozen")
        if role == "frozen":
            engine.trained_module.eval()
        return engine

    def _value_engine(self, policy_weights: dict[str, Tensor]) -> Any:
        """Llama 2 initialises the value model from the (helpfulness) reward model; "policy" and "" are for
        runs without one."""
        init, objective = self.cfg.ppo.value_init, ValueObjective(clip=self.cfg.ppo.value_clip)
        if init == "policy":
            return self._engine("value", objective, self.model_cfg, zero_head(policy_weights, dim=self.model_cfg.dim))
        if init == "":
            return self._engine("value", objective, self.model_cfg, None)
        model_cfg, weights, _ = read_scalar_model(resolve_path(self.cfg.reward.helpful if init == "helpful_rm"
                                                               else init))
        return self._engine("value", objective, model_cfg, weights)

    def _scorer(self, spec: str, *, key: str) -> Any:
        if not resolve_path(spec).is_dir():
            if ":" not in spec:  # meant as a reward-model directory
                what = "does not exist" if not resolve_path(spec).exists() else "is not a directory"
                raise ConfigError(f"{key}={spec!r} {what}: give a reward-model run directory (the --run.dir of "
                                  "python -m rlhf.reward) or a scorer: target_tokens:IDS, avoid_tokens:IDS, "
                                  "keyword:WORD, constant:P, module:callable")
            return build_scorer(spec, tokenizer=self.tokenizer, vocab_size=self.model_cfg.vocab_size)
        check_reward_model(resolve_path(spec), key=key, allow_weak=self.cfg.reward.allow_weak_rm,
                           flag="--reward.allow_weak_rm=true")
        model_cfg, weights, meta = read_scalar_model(resolve_path(spec))  # a reward model: a frozen engine under TP x ZeRO
        self._check_same_tokens(spec, meta)
        engine = self._engine("frozen", RewardObjective(), model_cfg, weights)
        return RewardModelScorer(engine, micro_batch_size=self.cfg.train.micro_batch_size, pad_id=self.pad_id,
                                 end_id=self.stop_ids[0], max_len=int(meta.get("max_len", model_cfg.max_seq_len)))

    def _check_same_tokens(self, spec: str, meta: dict[str, Any]) -> None:
        """The reward model must read the policy's token ids: same tokenizer file and chat template."""
        if self.tokenizer is None:
            raise ConfigError(f"reward model {spec} scores token ids of a tokenizer: set data.tokenizer")
        theirs = meta.get("tokenizer")
        if theirs and Path(theirs).is_file():
            from model.tokenizer import load_tokenizer

            same = load_tokenizer(theirs).file_hash() == self.tokenizer.file_hash()
        else:
            same = True  # the RM's tokenizer file is not on this machine: trust data.tokenizer
        if not same:
            raise ConfigError(f"reward model {spec} was trained with another tokenizer ({meta.get('tokenizer')}) than "
                              f"data.tokenizer={self.cfg.data.tokenizer}")
        if meta.get("template", self.cfg.prompts.template) != self.cfg.prompts.template:
            raise ConfigError(f"reward model {spec} uses the {meta['template']!r} chat format but prompts.template="
                              f"{self.cfg.prompts.template!r}")

    def _reward_stage(self) -> RewardStage:
        r = self.cfg.reward
        return RewardStage(helpful=self._scorer(r.helpful, key="reward.helpful"),
                           safety=self._scorer(r.safety, key="reward.safety") if r.safety else None,
                           kind=r.kind, threshold=r.safety_threshold, whiten=r.whiten, group=self.topo.dp_group)

    # ---- one iteration ---------------------------------------------------------------------------------
    def _rollout(self, prompts: list[ro.Prompt], seeds: list[int], *, temperature: float) -> tuple[list, float]:
        r = self.cfg.rollout
        return ro.rollout(self.policy, prompts, seeds=seeds, mode=r.gather, max_new_tokens=r.max_new_tokens,
                          temperature=temperature, top_p=r.top_p, stop_ids=self.stop_ids, pad_id=self.pad_id,
                          batch_size=r.batch_size)

    def make_experience(self, samples: list[ro.Sample]) -> Experience:
        """Score the rollouts with every role and turn the rewards into advantages and value targets."""
        c, micro = self.cfg, self.cfg.train.micro_batch_size
        old_logp = ro.score_tokens(self.policy, samples, micro_batch_size=micro, pad_id=self.pad_id)
        ref_logp = ro.score_tokens(self.reference, samples, micro_batch_size=micro, pad_id=self.pad_id)
        values = ro.score_tokens(self.value, samples, micro_batch_size=micro, pad_id=self.pad_id, value=True)
        reward = self.rewards(samples)
        logp_t, mask = ro.padded(old_logp)
        ref_t, _ = ro.padded(ref_logp)
        values_t, _ = ro.padded(values)
        token_rewards = kl_penalized_rewards(reward.score, logp_t, ref_t, mask, c.beta, kind=c.reward.kl_penalty)
        adv, ret = gae(token_rewards, values_t, mask, gamma=c.ppo.gamma, lam=c.ppo.lam)
        if c.ppo.whiten_advantages:
            adv = global_masked_whiten(adv, mask, group=self.topo.dp_group)
        lengths = [len(s.answer) for s in samples]
        return Experience(samples=samples, old_logp=old_logp, ref_logp=ref_logp, values=values,
                          advantages=ro.unpadded(adv, lengths), returns=ro.unpadded(ret, lengths), reward=reward)

    def update(self, exp: Experience) -> dict[str, float]:
        """One gradient step of the policy and one of the value model per minibatch (``ppo.epochs`` passes)."""
        c, dp = self.cfg, self.topo.dp_size
        local_minibatch, micro = c.train.global_batch_size // dp, c.train.micro_batch_size
        value_lr = c.ppo.value_lr if c.ppo.value_lr > 0 else c.optim.lr
        norms: dict[str, list[float]] = {"policy_grad_norm": [], "value_grad_norm": [], "skipped_steps": []}
        for _ in range(c.ppo.epochs):
            for start in range(0, len(exp.samples), local_minibatch):
                idx = range(start, start + local_minibatch)
                pieces = [list(idx[i : i + micro]) for i in range(0, local_minibatch, micro)]
                policy_mbs = [ro.collate([exp.samples[i] for i in p], pad_id=self.pad_id, per_token={
                    "old_logp": [exp.old_logp[i] for i in p], "advantages": [exp.advantages[i] for i in p]})
                    for p in pieces]
                value_mbs = [ro.collate([exp.samples[i] for i in p], pad_id=self.pad_id, per_token={
                    "old_values": [exp.values[i] for i in p], "returns": [exp.returns[i] for i in p]})
                    for p in pieces]
                step = self.policy.train_step(iter(policy_mbs), c.optim.lr)
                vstep = self.value.train_step(iter(value_mbs), value_lr)
                norms["policy_grad_norm"].append(step.grad_norm)
                norms["value_grad_norm"].append(vstep.grad_norm)
                norms["skipped_steps"].append(float(step.skipped) + float(vstep.skipped))
        stats = self._reduce_stats(self.policy.trained_module.stats.pop())
        stats.update(self._reduce_stats(self.value.trained_module.stats.pop()))
        stats.update({k: (sum(v) if k == "skipped_steps" else sum(v) / max(len(v), 1)) for k, v in norms.items()})
        return stats

    def _reduce_stats(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if self.topo.dp_size > 1:
            t = comm.all_reduce(t, group=self.topo.dp_group)
        total = dict(zip(keys, t.tolist()))
        n = max(total.pop("tokens", 1.0), 1.0)
        return {k: v / n for k, v in total.items()}

    def _finite(self, exp: Experience) -> bool:
        """True on every rank iff no rank has a NaN/Inf reward, log-prob or value."""
        bad = any(not bool(torch.isfinite(t).all()) for t in [exp.reward.score, *exp.old_logp, *exp.ref_logp,
                                                              *exp.values, *exp.advantages])
        return not comm.any_rank(bad)

    def rollout_metrics(self, exp: Experience, *, prefix: str = "") -> dict[str, float]:
        """Reward, KL and length statistics over every rank's samples (global means)."""
        g, r = self.topo.dp_group, exp.reward
        seq_k1 = torch.stack([(a - b).sum() for a, b in zip(exp.old_logp, exp.ref_logp)])
        k3 = torch.cat([kl_estimate(a, b, kind="k3") for a, b in zip(exp.old_logp, exp.ref_logp)])
        is_safety = torch.tensor([s.prompt.is_safety for s in exp.samples])
        sums = torch.tensor([
            float(r.helpful.sum()), float(r.safety.sum()), float(r.combined.sum()), float(logit(r.combined).sum()),
            float(r.used_safety.float().sum()), float(seq_k1.sum()), float(k3.sum()), float(k3.numel()),
            float(sum(len(s.answer) for s in exp.samples)), float(sum(s.truncated for s in exp.samples)),
            float(r.safety[is_safety].sum()), float(is_safety.sum()), float(len(exp.samples))], dtype=torch.float64)
        if self.topo.dp_size > 1:
            sums = comm.all_reduce(sums, group=g)
        s = sums.tolist()
        n = max(s[12], 1.0)
        return {f"{prefix}reward/helpful": s[0] / n, f"{prefix}reward/safety": s[1] / n,
                f"{prefix}reward/combined": s[2] / n, f"{prefix}reward/logit_combined": s[3] / n,
                f"{prefix}reward/used_safety": s[4] / n, f"{prefix}kl": s[5] / n,
                f"{prefix}kl_k3": s[6] / max(s[7], 1.0), f"{prefix}response_length": s[8] / n,
                f"{prefix}truncated": s[9] / n,
                f"{prefix}reward/safety_on_safety_prompts": s[10] / s[11] if s[11] else float("nan")}

    def collect(self, it: int) -> tuple[Experience, dict[str, Any]]:
        """Rollouts of iteration ``it`` (0-based) on this rank's prompts, scored: ``(experience, metrics)``."""
        c = self.cfg
        batch = iteration_prompts(self.train_prompts, iteration=it, n=c.ppo.prompts_per_iteration, seed=c.train.seed)
        local = shard(batch, dp_rank=self.topo.dp_rank, dp_size=self.topo.dp_size)
        seeds = [ro.answer_seed(c.train.seed, it, p.index) for p in local]
        samples, gen_s = self._rollout(local, seeds, temperature=c.rollout.temperature)
        t0 = time.perf_counter()
        exp = self.make_experience(samples)
        record: dict[str, Any] = {"step": it + 1, "gen_time_s": gen_s, "score_time_s": time.perf_counter() - t0}
        record.update(self.rollout_metrics(exp))
        record["rollout_tokens_per_s"] = record["response_length"] * c.ppo.prompts_per_iteration / max(gen_s, 1e-9)
        return exp, record

    def iteration(self, it: int) -> dict[str, Any]:
        """Rollout, experience and update of iteration ``it`` (0-based); returns its metrics."""
        exp, record = self.collect(it)
        if not self._finite(exp):
            record.update(skipped=True, event=self.guards.nonfinite(it + 1, what="rewards / log-probs / values"))
            return record
        t0 = time.perf_counter()
        record.update(self.update(exp))
        record["train_time_s"] = time.perf_counter() - t0
        if not (math.isfinite(record["policy_loss"]) and math.isfinite(record["value_loss"])):
            record.update(skipped=True, event=self.guards.nonfinite(it + 1, what="losses"))
            return record
        alarms = self.guards.observe(it + 1, kl=record["kl"], k1_mean=record["kl"],
                                     reward=record["reward/logit_combined"])
        record.update(skipped=False, alarms=alarms, alarms_total=self.guards.alarms_total)
        return record

    # ---- evaluation and export -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out prompts, fixed seeds: rewards (unwhitened), KL and length; ``heldout/`` keys."""
        c = self.cfg
        local = shard(self.heldout, dp_rank=self.topo.dp_rank, dp_size=self.topo.dp_size)
        seeds = [ro.answer_seed(c.train.seed + 1, 0, p.index) for p in local]
        temperature = c.eval.temperature if c.eval.temperature > 0 else c.rollout.temperature
        samples, _ = self._rollout(local, seeds, temperature=temperature)
        micro = c.train.micro_batch_size
        logp = ro.score_tokens(self.policy, samples, micro_batch_size=micro, pad_id=self.pad_id)
        ref = ro.score_tokens(self.reference, samples, micro_batch_size=micro, pad_id=self.pad_id)
        reward = self.rewards(samples, whiten=False)
        exp = Experience(samples=samples, old_logp=logp, ref_logp=ref, values=[], advantages=[], returns=[],
                         reward=reward)
        return self.rollout_metrics(exp, prefix="heldout/")

    def export(self, name: str, *, value: bool = False) -> Path:
        """Consolidated weights of the policy (native format) or value model into ``RUN_DIR/name``."""
        out = Path(self.cfg.run.dir) / name
        engine = self.value if value else self.policy
        from train.task import exported_weights

        meta = policy_meta(stage="ppo", tokenizer=self.cfg.data.tokenizer, template=self.cfg.prompts.template,
                           max_len=engine.model_cfg.max_seq_len)
        if not value:
            return export_policy(engine, self.model_cfg, out, rank=comm.rank(), meta=meta)
        with exported_weights(engine, out) as weights:  # collective: rank 0 streams from every rank's fragments
            if weights is not None:
                write_scalar_model(weights, engine.model_cfg, out, meta={**meta, "role": "ppo value model"})
        comm.barrier()
        return out

    # ---- the run ---------------------------------------------------------------------------------------
    def _evaluate_and_track(self, it: int, record: dict[str, Any], log: PPOMetricsLogger) -> None:
        held = self.evaluate()
        record.update(held)
        alarms = self.guards.observe_heldout(it, held["heldout/reward/logit_combined"])
        record["alarms"] = [*record.get("alarms", []), *alarms]
        record["alarms_total"] = self.guards.alarms_total
        if self.stopper.update(held["heldout/reward/logit_combined"], iteration=it):
            self.export("best_policy")
            log.event(f"iteration {it}: best held-out LOGIT(Rc) {held['heldout/reward/logit_combined']:.4f} "
                      f"-> {self.cfg.run.dir}/best_policy")

    def run(self) -> PPOResult:
        """The whole run, or its continuation from a checkpoint (``--run.resume``); every rank calls it."""
        from rlhf.ppo import checkpoint as ck
        from train.preemption import EXIT_CODES, PreemptionFlag

        c, run_dir = self.cfg, Path(self.cfg.run.dir)
        if self.topo.global_rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "ppo_config.toml").write_text(c.to_toml())
        comm.barrier()
        ckpt, roles = ck.checkpoint_manager(c, self.topo), ck.TrainedRoles(policy=self.policy, value=self.value)
        state = ck.resume(ckpt, c.run.resume, roles=roles, guards=self.guards, stopper=self.stopper)
        log = self._logger(run_dir, state, ckpt.warnings)
        history: list[dict[str, Any]] = []
        first, preempted = state.iteration, ""
        preempt = PreemptionFlag().install()
        try:
            if c.eval.every and state.iteration == 0:
                start = {"step": 0}
                self._evaluate_and_track(0, start, log)
                history.append(log.log(start))
            last = state.iteration if state.stopped else c.ppo.iterations  # a stopped run only exports again
            for it in range(state.iteration + 1, last + 1):
                state.stopped = self._one_iteration(it, log, history)
                state.iteration = it
                stop = comm.any_rank(preempt.signum is not None)  # ranks may see the signal at different moments
                if stop or state.stopped or it == last or (c.checkpoint.every and it % c.checkpoint.every == 0):
                    path = ck.save(ckpt, state, roles=roles, guards=self.guards, stopper=self.stopper, config=c)
                    log.event(f"checkpoint iteration {it} -> {path}")
                if stop:
                    preempted = signal.Signals(comm.broadcast_object(preempt.signum or signal.SIGTERM)).name
                    log.event(f"pre-empted ({preempted}) at iteration {it}: checkpoint saved; continue with "
                              "--resume auto")
                    break
                if state.stopped:
                    break
            if not preempted:
                self.export("final_policy")
                self.export("final_value", value=True)
            ckpt.wait()  # the last checkpoint is published before the run reports its end
            comm.barrier()
        finally:
            preempt.restore()
            log.close()
        reason = f"preempted:{preempted}" if preempted else state.stopped or "completed"
        return PPOResult(run_dir=run_dir, iterations=state.iteration, reason=reason,
                         best_iteration=self.stopper.best_iteration, best_heldout=self.stopper.best,
                         history=history, exit_code=EXIT_CODES[signal.Signals[preempted]] if preempted else 0,
                         start_iteration=first)

    def _logger(self, run_dir: Path, state: Any, warnings_: list[str]) -> PPOMetricsLogger:
        c = self.cfg
        # The metrics position is the iteration: records after the checkpoint are cut (a fresh start clears all).
        log = PPOMetricsLogger(run_dir, config=dataclasses.asdict(c), enabled=self.topo.global_rank == 0,
                               wandb=c.logging.wandb, wandb_project=c.logging.wandb_project,
                               wandb_mode_setting=c.logging.wandb_mode, print_fn=self.print,
                               start_step=state.iteration if state.resumed_from else -1)
        for message in warnings_:
            log.event(f"warning: {message}")
        log.event(f"PPO {self.model_cfg.name} ({self.model_cfg.num_params() / 1e6:.2f}M), world "
                  f"{self.topo.world_size} (tp {self.topo.tp_size}, dp {self.topo.dp_size}), ZeRO "
                  f"{c.zero.stage}/{c.frozen_stage}, beta {c.beta}, {len(self.train_prompts)} train / "
                  f"{len(self.heldout)} held-out prompts; "
                  + (f"resumed from {state.resumed_from} at iteration {state.iteration}" if state.resumed_from
                     else "fresh start"))
        return log

    def _one_iteration(self, it: int, log: PPOMetricsLogger, history: list[dict[str, Any]]) -> str:
        """Iteration ``it`` (1-based) with its evaluation and logging; "" to go on, else why the loop ends."""
        c = self.cfg
        record = self.iteration(it - 1)
        if c.eval.every and (it % c.eval.every == 0 or it == c.ppo.iterations):
            self._evaluate_and_track(it, record, log)
        history.append(log.log(record))
        for alarm in record.get("alarms", []):
            log.event(f"ALARM {alarm}")
        if record.get("alarms") and c.guards.stop_on_alarm:
            return "alarm"
        if self.stopper.should_stop:
            log.event(f"early stop at iteration {it}: no held-out gain for {c.eval.patience} evaluations "
                      f"(best {self.stopper.best:.4f} at iteration {self.stopper.best_iteration})")
            return "early_stop"
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, PPOConfig, prog="python -m rlhf.ppo",
                         example="--config configs/rlhf/ppo_tiny.toml --ppo.iterations=5 --run.dir=runs/ppo_tiny")
    args, overrides = parser.parse_known_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:  # config errors (also those found while building the roles) and the non-finite abort: one line
        cfg = PPOConfig.from_toml(args.config, overrides)
        result = PPOTrainer(cfg).run()
    except (ConfigError, NonFinitePPO) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = (f"best held-out LOGIT(Rc) {result.best_heldout:.4f} at iteration {result.best_iteration}"
            if result.best_iteration >= 0 else "no held-out evaluation (eval.every=0)")
    print(f"PPO {result.reason} after {result.iterations} iterations; {best}; run dir {result.run_dir}")
    return result.exit_code
