"""The training loop: topology -> data -> engine -> steps with health checks, metrics, eval, checkpoints.

    from train.config import RunConfig
    from train.loop import train
    result = train(RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", ["--run.dir=runs/tiny"]))

One optimizer step per iteration (``train`` below, on one screen)::

    lr = schedule(step)                                  # warmup + cosine (train/schedule.py)
    result = engine.train_step(micro_batches, lr)        # grad accumulation, clip, AdamW (train/engine.py)
    health.observe(...)                                  # NaN/Inf steps skipped and counted, spikes logged
    metrics.log_step(...)                                # JSONL + console + wandb (rank 0)
    periodic validation and [eval] benchmarks; checkpoint every N steps, at the end, and at the first step boundary after
    SIGTERM/SIGUSR1 (pre-emption), then exit: code 0 after SIGUSR1 (SLURM requeue), 143 after SIGTERM.

The parts live in their own modules: what is trained (``train/task.py``: the ``Task`` protocol, ``PretrainTask``),
the data (``train/data.py``), collectives (``model/comm.py``), pre-emption (``train/preemption.py``), the test
hooks (``train/hooks.py``), checkpoints (``train/checkpointing.py``), health (``train/health.py``) and metrics
(``train/metrics.py``); ``Run`` below wires them together once.

Determinism: the data order is a pure function of (seed, consumed_samples) (``data_pipeline.global_batch.GlobalBatchLoader``), the RNG
states are restored per rank from the checkpoint, so a resumed run on CPU reproduces the uninterrupted run's
per-step losses bit for bit. ``engine_factory`` / ``topology_factory`` (or the env test hooks
``LLAMA_TRAIN_ENGINE`` / ``LLAMA_TRAIN_TOPOLOGY`` = "module:name") let unit tests run the loop with a small
local engine; production uses ``train.engine.TrainEngine`` and ``train.topology.Topology``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import comm
from model.config import model_flops_per_token
from train.checkpointing import CheckpointManager
from train.config import RunConfig
from train.data import seed_everything
from train.health import HealthMonitor, guard_collectives
from train.hooks import default_engine, default_topology, hang_if_asked, loop_evaluator
from train.metrics import ComputedTokens, MetricsLogger, Throughput, peak_flops_per_device
from train.preemption import EXIT_CODES, PreemptionFlag
from train.preflight import check_data, check_memory
from train.schedule import schedule_from_config
from train.task import PretrainTask, Task


@dataclass
class RunResult:
    run_dir: Path
    start_step: int
    last_step: int
    reason: str  # "completed" | "preempted:SIGTERM" | "preempted:SIGUSR1"
    exit_code: int
    last_loss: float
    last_val_loss: float | None
    skipped_steps: int
    sequence_parallel: bool = False
    """Whether the engine ran Megatron sequence parallelism (``parallel.sequence_parallel`` as resolved)."""


def train(cfg: RunConfig, *, task: Task | None = None, engine_factory: Callable[..., Any] | None = None,
          topology_factory: Callable[[RunConfig], Any] | None = None, print_fn: Any = print) -> RunResult:
    """Run (or resume) the configured run of ``task`` (default: pretraining); returns how it ended."""
    run = Run(cfg, task or PretrainTask(), engine_factory=engine_factory or default_engine,
              topology_factory=topology_factory or default_topology, print_fn=print_fn)
    last_loss, last_val, step, reason = float("nan"), None, run.start, "completed"
    preempt = PreemptionFlag().install()
    try:
        if run.start == 0 and hasattr(run.task, "before_training"):  # e.g. SFT's held-out loss of the initial model
            run.task.before_training(run.engine, run.run_dir, rank=run.rank)
        for step in range(run.start + 1, cfg.train.steps + 1):
            last_loss = run.train_step(step)
            if run.valid_ds is not None and cfg.train.eval_every and (
                    step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                last_val = run.validate(step)
            if run.evaluator is not None and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                run.benchmark(step)
            hang_if_asked(run.rank, step)
            stop = run.guard("all_reduce (pre-emption check)", lambda: comm.any_rank(preempt.signum is not None))
            if stop or step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                run.save(step)
            if stop:
                reason = run.preempted(step, preempt.signum)
                break
        if reason == "completed":
            run.task.export(run.engine, run.model_cfg, run.run_dir / "final_model", rank=run.rank)
        run.ckpt.wait()  # the last checkpoint is published before the run reports its end
        comm.barrier()
    finally:
        preempt.restore()
        run.logger.close()
    exit_code = EXIT_CODES[signal.Signals[reason.split(":")[1]]] if reason != "completed" else 0
    return RunResult(run_dir=run.run_dir, start_step=run.start, last_step=step, reason=reason, exit_code=exit_code,
                     last_loss=last_loss, last_val_loss=last_val, skipped_steps=run.health.skipped_total,
                     sequence_parallel=bool(getattr(run.engine, "sequence_parallel", False)))


class Run:
    """One run's parts, built in order: config check, topology, run directory, data, engine, checkpoints and
    resume, health, loader, metrics. Every rank builds its own; the methods are collective."""

    def __init__(self, cfg: RunConfig, task: Task, *, engine_factory: Callable[..., Any],
                 topology_factory: Callable[[RunConfig], Any], print_fn: Any) -> None:
        self.cfg, self.task, self.model_cfg = cfg, task, cfg.model_config()
        cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
        check_memory(cfg, self.model_cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))  # before allocating
        self.data_plan = check_data(cfg, self.model_cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        self.topo = topology_factory(cfg)
        self.evaluator = loop_evaluator(cfg, self.topo)  # [eval]: checked now, before any data or weights
        self.rank, self.run_dir = self.topo.global_rank, cfg.run_dir
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_toml(self.run_dir / "config.toml")
        comm.barrier()
        seed_everything(cfg.train.seed)
        self.train_ds, self.valid_ds, self.eod = task.build_datasets(cfg, self.model_cfg, dp_size=self.topo.dp_size,
                                                                     run_dir=self.run_dir)
        self.engine = engine_factory(model_cfg=self.model_cfg, engine_cfg=cfg.engine_config(), topology=self.topo,
                                     **task.engine_kwargs(cfg, self.model_cfg))
        self.ckpt = CheckpointManager(self.run_dir, rank=self.rank, world_size=self.topo.world_size,
                                      keep_last=cfg.checkpoint.keep_last, barrier=comm.barrier,
                                      broadcast=comm.broadcast_object, all_gather=comm.all_gather_object,
                                      async_save=cfg.checkpoint.async_save,
                                      publish_timeout_s=cfg.train.collective_timeout_s)
        self.repacked = ""
        state, resume_from = self._resume()
        self.start = state["step"]
        self.health = HealthMonitor(max_consecutive_nonfinite=cfg.train.max_consecutive_nonfinite,
                                    spike_factor=cfg.train.spike_factor)
        if state["health"]:
            self.health.load_state_dict(state["health"])
        self.loader = task.loader(self.train_ds, global_batch_size=cfg.train.global_batch_size,
                                  micro_batch_size=cfg.train.micro_batch_size, dp_rank=self.topo.dp_rank,
                                  dp_size=self.topo.dp_size, consumed_samples=state["consumed_samples"], eod=self.eod)
        self.batches = ComputedTokens(iter(self.loader), self.model_cfg)  # MFU from the tokens actually computed
        self.schedule = schedule_from_config(cfg)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self._start_metrics(state["wandb_id"], resume_from, print_fn)
        if self.repacked:
            self.logger.log_event(self.repacked)

    def _resume(self) -> tuple[dict[str, Any], Path | None]:
        """The loop's counters from the checkpoint to resume from (which also restores the engine), or fresh."""
        self.ckpt.clean_leftovers()
        resume_from = self.ckpt.find_resume(self.cfg.run.resume)
        state: dict[str, Any] = {"step": 0, "consumed_samples": 0, "health": None, "wandb_id": None}
        if resume_from is not None:
            client = self.ckpt.load(resume_from, engine=self.engine)
            meta = client.pop("meta")
            state.update({k: client.get(k, meta.get(k)) for k in state})
            state["wandb_id"] = meta.get("wandb_id")
            state["consumed_samples"] = self._samples_at_seq_len(state["consumed_samples"], meta)
        return state, resume_from

    def _samples_at_seq_len(self, samples: int, meta: dict[str, Any]) -> int:
        """A resume at another ``data.seq_len`` (a long-context stage): the loader re-packs the documents into
        sequences of the new length and continues after the tokens already consumed (rounded down to whole new
        sequences); the data order is the new packing's."""
        saved = int(meta.get("config", {}).get("data", {}).get("seq_len", self.cfg.data.seq_len))
        if saved == self.cfg.data.seq_len:
            return samples
        self.repacked = (f"data.seq_len {saved} -> {self.cfg.data.seq_len}: {samples * saved:,} tokens consumed, "
                         f"continuing at sample {samples * saved // self.cfg.data.seq_len:,} of the re-packed data")
        return samples * saved // self.cfg.data.seq_len

    def _start_metrics(self, wandb_id: str | None, resume_from: Path | None, print_fn: Any) -> None:
        cfg, topo, model_cfg = self.cfg, self.topo, self.model_cfg
        # Rank 0 alone finds the peak (a measurement on the other ranks would compete with its own for the cores).
        peak, peak_source = peak_flops_per_device(self.run_dir, dtype=cfg.train.dtype,
                                                  override_tflops=cfg.logging.peak_tflops,
                                                  device_key=cfg.logging.gpu) if self.rank == 0 else (0.0, "")
        self.peak = comm.broadcast_object(peak)
        self.throughput = Throughput(flops_per_token=model_flops_per_token(model_cfg, cfg.data.seq_len),
                                     peak_flops=self.peak, devices=topo.world_size)
        self.logger = MetricsLogger(
            self.run_dir, total_steps=cfg.train.steps, config=cfg.to_dict(), enabled=self.rank == 0,
            log_every=cfg.train.log_every, wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
            wandb_mode_setting=cfg.logging.wandb_mode, wandb_id=wandb_id, tensorboard=cfg.logging.tensorboard,
            start_step=self.start, print_fn=print_fn)
        for message in self.ckpt.warnings:
            self.logger.log_event(f"warning: {message}")
        self.logger.log_event(
            f"run {self.run_dir}: model {model_cfg.name} ({model_cfg.num_params() / 1e6:.1f}M params), "
            f"world {topo.world_size} (tp {topo.tp_size} pp {topo.pp_size} dp {topo.dp_size}), "
            f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens/step, "
            + (f"resumed from {resume_from} at step {self.start}" if resume_from else "fresh start")
            + f"; peak {self.peak / 1e12:.2f} TFLOP/s/device ({peak_source})")
        for line in self.data_plan:  # the pre-flight's epochs and index size per split
            self.logger.log_event(line)

    def guard(self, op: str, fn: Callable[[], Any]) -> Any:
        return guard_collectives(op, fn, rank=self.rank, timeout_s=self.cfg.train.collective_timeout_s)

    def train_step(self, step: int) -> float:
        """One optimizer step, checked and logged; returns its loss."""
        lr = self.schedule(step - 1)
        t0 = time.perf_counter()
        result = self.guard("train_step", lambda: self.engine.train_step(self.batches, lr))
        seconds = time.perf_counter() - t0
        tokens, flops = comm.all_reduce_values(self.batches.pop(), group=getattr(self.topo, "dp_group", None))
        if tokens == 0:  # batches without input_ids (test engines): the configured size
            tokens, flops = self.tokens_per_step, None
        event = self.health.observe(step, loss=float(result.loss), grad_norm=float(result.grad_norm),
                                    skipped=bool(result.skipped))
        # A task may add its own per-step metrics (DPO: implicit rewards, accuracy); collective, like the step.
        extra = self.task.step_metrics(self.engine) if hasattr(self.task, "step_metrics") else {}
        self.logger.log_step({"step": step, "loss": float(result.loss), "lr": lr,
                              "grad_norm": float(result.grad_norm), "tokens": int(tokens),
                              **self.throughput.measure(int(tokens), seconds, flops=flops), "peak_flops": self.peak,
                              "consumed_samples": self.loader.consumed_samples, "skipped": event == "skipped",
                              "skipped_total": self.health.skipped_total, "spike": event == "spike", **extra})
        return float(result.loss)

    def validate(self, step: int) -> float:
        loss = evaluate(self.cfg, self.engine, self.valid_ds, self.topo, self.eod, task=self.task)
        self.logger.log_validation(step=step, loss=loss,
                                   name=getattr(self.task, "validation_loss", "held-out next-token loss"),
                                   perplexity=getattr(self.task, "perplexity", True))
        return loss

    def benchmark(self, step: int) -> dict[str, float]:
        """``[eval]``: lm-eval tasks and held-out perplexity on the live model, logged as one record."""
        metrics = self.guard("in-loop evaluation", lambda: self.evaluator.evaluate(self.engine, step=step))
        self.logger.log_benchmarks(step=step, metrics=metrics)
        return metrics

    def save(self, step: int) -> None:
        client = {"step": step, "consumed_samples": self.loader.consumed_samples, "health": self.health.state_dict()}
        meta = {**client, "config": self.cfg.to_dict(), "wandb_id": self.logger.wandb_id,
                "model_config": self.model_cfg.to_dict()}
        path = self.guard("checkpoint save", lambda: self.ckpt.save(step=step, engine=self.engine,
                                                                    client_state=client, meta=meta))
        self.logger.log_event(f"checkpoint step {step} -> {path}")

    def preempted(self, step: int, signum: int | None) -> str:
        """The run's end reason after a pre-emption (rank 0's signal, which every rank then reports)."""
        name = signal.Signals(comm.broadcast_object(signum or signal.SIGTERM)).name
        self.logger.log_event(f"pre-empted ({name}) at step {step}: checkpoint saved; continue with --resume auto")
        return f"preempted:{name}"


def evaluate(cfg: RunConfig, engine: Any, valid_ds: Any, topo: Any, eod: int, *, task: Task | None = None) -> float:
    """Mean validation loss over the same ``eval_batches`` held-out micro-batches every time."""
    mb = cfg.train.micro_batch_size
    loader = (task or PretrainTask()).loader(valid_ds, global_batch_size=mb * topo.dp_size, micro_batch_size=mb,
                                             dp_rank=topo.dp_rank, dp_size=topo.dp_size, consumed_samples=0,
                                             eod=eod)
    loss = guard_collectives("eval_loss", lambda: engine.eval_loss(iter(loader), cfg.train.eval_batches),
                             rank=topo.global_rank, timeout_s=cfg.train.collective_timeout_s)
    return float(loss)
