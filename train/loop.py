"""The pretraining loop: topology -> data -> engine -> steps with health checks, metrics, eval, checkpoints.

    from train.config import RunConfig
    from train.loop import train
    result = train(RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", ["--run.dir=runs/tiny"]))

One optimizer step per iteration::

    lr = schedule(step)                                  # warmup + cosine (train/schedule.py)
    result = engine.train_step(micro_batches, lr)        # grad accumulation, clip, AdamW (train/engine.py)
    health.observe(...)                                  # NaN/Inf steps skipped and counted, spikes logged
    metrics.log_step(...)                                # JSONL + console + wandb (rank 0)
    periodic validation; checkpoint every N steps, at the end, and at the first step boundary after
    SIGTERM/SIGUSR1 (pre-emption), then exit: code 0 after SIGUSR1 (SLURM requeue), 143 after SIGTERM.

Determinism: the data order is a pure function of (seed, consumed_samples) (``PretrainLoader``), the RNG
states are restored per rank from the checkpoint, so a resumed run on CPU reproduces the uninterrupted run's
per-step losses bit for bit. ``engine_factory`` / ``topology_factory`` (or the env test hooks
``LLAMA_TRAIN_ENGINE`` / ``LLAMA_TRAIN_TOPOLOGY`` = "module:name") let unit tests run the loop with a small
local engine; production uses ``train.engine.TrainEngine`` and ``train.topology.Topology``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model.config import model_flops_per_token
from train.checkpointing import CheckpointManager
from train.config import ConfigError, RunConfig
from train.health import HealthMonitor, describe_collective_timeout
from train.metrics import MetricsLogger, Throughput, peak_flops_per_device
from train.schedule import schedule_from_config

EXIT_CODES = {signal.SIGUSR1: 0, signal.SIGTERM: 143}


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


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
class SyntheticDataset:
    """Deterministic, learnable packed documents (arithmetic token runs ended by EOD=2), indexable like GPTDataset.

    Sample ``i`` depends only on (seed, offset + i), so any DP layout and any resume point see the same data.
    """

    EOD = 2

    def __init__(self, *, vocab_size: int, seq_len: int, seed: int, num_samples: int, offset: int = 0) -> None:
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.num_samples, self.offset = num_samples, offset
        self.config = SimpleNamespace(tokenizer=SimpleNamespace(eod=self.EOD))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + int(i))
        usable = self.vocab_size - 3
        out, n = [], self.seq_len + 1
        while n > 0:
            length = int(torch.randint(4, 48, (1,), generator=g))
            start, stride = (int(x) for x in torch.randint(0, usable, (2,), generator=g))
            doc = (start + (stride % 7 + 1) * torch.arange(length)) % usable + 3
            out += [doc, torch.tensor([self.EOD])]
            n -= length + 1
        tokens = torch.cat(out)[: self.seq_len + 1]
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(self.seq_len)}


class PretrainTask:
    """What the loop trains: data, batching, objective, initial weights, export. This one is pretraining.

    Alignment stages (``rlhf/``) pass their own task with the same five members to ``train(cfg, task=...)``
    and get the loop's checkpoints, resume, health checks, metrics and pre-emption handling unchanged.
    """

    name = "pretrain"

    def build_datasets(self, cfg: RunConfig, model_cfg: Any, *, dp_size: int,
                       run_dir: Path) -> tuple[Any, Any, int]:
        return build_datasets(cfg, model_cfg, dp_size=dp_size, run_dir=run_dir)

    def loader(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
               consumed_samples: int, eod: int) -> Any:
        """An iterable of micro-batch dicts with a ``consumed_samples`` attribute (global samples so far)."""
        from data_pipeline.loader import PretrainLoader

        return PretrainLoader(dataset, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                              dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples, eod_id=eod)

    def engine_kwargs(self, cfg: RunConfig, model_cfg: Any) -> dict[str, Any]:
        """Extra ``TrainEngine`` arguments (``objective``, ``init_weights``); none for pretraining."""
        return {}

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        export_final(engine, model_cfg, out_dir, rank=rank)


def build_datasets(cfg: RunConfig, model_cfg: Any, *, dp_size: int, run_dir: Path) -> tuple[Any, Any, int]:
    """(train dataset, valid dataset or None, eod id) for the configured source."""
    t = cfg.train
    n_train = t.steps * t.global_batch_size
    n_valid = t.eval_batches * t.micro_batch_size * dp_size if t.eval_every > 0 else 0
    if cfg.data.synthetic:
        common = dict(vocab_size=model_cfg.vocab_size, seq_len=cfg.data.seq_len, seed=t.seed)
        valid = SyntheticDataset(**common, num_samples=n_valid, offset=10**9) if n_valid else None
        return SyntheticDataset(**common, num_samples=n_train), valid, SyntheticDataset.EOD
    try:  # the data checks (data_pipeline cannot name our config keys): a ConfigError naming data.path
        train_ds, valid_ds, tok_info = _prepared_datasets(cfg, model_cfg, n_train=n_train, n_valid=n_valid,
                                                          run_dir=run_dir)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.path={cfg.data.path!r}: {err}") from err
    return train_ds, valid_ds, int(tok_info["eos_id"])


def _prepared_datasets(cfg: RunConfig, model_cfg: Any, *, n_train: int, n_valid: int,
                       run_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    from data_pipeline.blend import read_manifest
    from data_pipeline.loader import build_pretrain_datasets, check_tokenizer_matches

    path = Path(cfg.data.path)
    manifest_dir = path if path.is_dir() else None
    tok_info = read_manifest(manifest_dir)["tokenizer"] if manifest_dir else None
    if cfg.data.tokenizer and manifest_dir:
        from model.tokenizer import load_tokenizer

        check_tokenizer_matches(manifest_dir, load_tokenizer(cfg.data.tokenizer), model_cfg.vocab_size,
                                allow_padded_vocab=True)
    if tok_info is None:
        raise ConfigError(f"data.path={cfg.data.path!r}: expected a `python -m data_pipeline prepare` output "
                          "directory holding manifest.json")
    if tok_info["vocab_size"] > model_cfg.vocab_size:
        raise ConfigError(f"{path}/manifest.json: data tokenized with vocab {tok_info['vocab_size']} but model "
                          f"{model_cfg.name!r} has vocab_size={model_cfg.vocab_size}; set "
                          f"--model.overrides.vocab_size={tok_info['vocab_size']} or re-tokenize")
    train_ds, valid_ds, _ = build_pretrain_datasets(
        data_dir_or_blend=path, seq_len=cfg.data.seq_len, seed=cfg.train.seed, split=cfg.data.split,
        num_samples=(n_train, n_valid, 0), tokenizer_info=tok_info, cache_dir=run_dir / "data_cache")
    return train_ds, valid_ds, tok_info


# ---------------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in one process)
# ---------------------------------------------------------------------------------------------------
def _multi() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _multi():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    if not _multi():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (small Python objects: verification verdicts)."""
    if not _multi():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (pre-emption signals can reach ranks at different moments)."""
    if not _multi():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionFlag:
        for s in EXIT_CODES:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _guard(op: str, fn: Callable[[], Any], *, rank: int, timeout_s: float) -> Any:
    """Run a step that contains collectives; a timeout becomes a message naming the rank and the op."""
    try:
        return fn()
    except RuntimeError as err:
        text = str(err).lower()
        if "timed out" in text or "timeout" in text or "deadline" in text:
            raise RuntimeError(describe_collective_timeout(err, rank=rank, op=op, timeout_s=timeout_s)) from err
        raise


def _test_hang(rank: int, step: int) -> None:
    """Test hook ``LLAMA_TEST_HANG=RANK:STEP``: that rank stops answering collectives at that step."""
    spec = os.environ.get("LLAMA_TEST_HANG", "")
    if spec and tuple(int(x) for x in spec.split(":")) == (rank, step):
        time.sleep(3600)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _import(spec: str) -> Any:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _default_topology(cfg: RunConfig) -> Any:
    if os.environ.get("LLAMA_TRAIN_TOPOLOGY"):  # test hook: "module:callable(cfg)"
        return _import(os.environ["LLAMA_TRAIN_TOPOLOGY"])(cfg)
    from train.topology import Topology

    return Topology.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, timeout_s=cfg.train.collective_timeout_s)


def _default_engine(*, model_cfg: Any, run_cfg: RunConfig, topology: Any, **kwargs: Any) -> Any:
    if os.environ.get("LLAMA_TRAIN_ENGINE"):  # test hook: "module:Class" with TrainEngine's interface
        return _import(os.environ["LLAMA_TRAIN_ENGINE"])(model_cfg=model_cfg, run_cfg=run_cfg, topology=topology,
                                                         **kwargs)
    from train.engine import TrainEngine

    return TrainEngine(model_cfg=model_cfg, run_cfg=run_cfg, topology=topology, **kwargs)


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
def train(cfg: RunConfig, *, task: Any = None, engine_factory: Callable[..., Any] | None = None,
          topology_factory: Callable[[RunConfig], Any] | None = None, print_fn: Any = print) -> RunResult:
    """Run (or resume) the configured run of ``task`` (default: pretraining); returns how it ended."""
    task = task or PretrainTask()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = cfg.model_config()
    cfg.validate(world_size=world_env)
    topo = (topology_factory or _default_topology)(cfg)
    rank, run_dir = topo.global_rank, cfg.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_toml(run_dir / "config.toml")
    barrier()
    seed_everything(cfg.train.seed)
    train_ds, valid_ds, eod = task.build_datasets(cfg, model_cfg, dp_size=topo.dp_size, run_dir=run_dir)
    engine = (engine_factory or _default_engine)(model_cfg=model_cfg, run_cfg=cfg, topology=topo,
                                                 **task.engine_kwargs(cfg, model_cfg))

    ckpt = CheckpointManager(run_dir, rank=rank, world_size=topo.world_size, keep_last=cfg.checkpoint.keep_last,
                             barrier=barrier, broadcast=broadcast_object, all_gather=all_gather_object,
                             async_save=cfg.checkpoint.async_save,
                             publish_timeout_s=cfg.train.collective_timeout_s)
    ckpt.clean_leftovers()
    resume_from = ckpt.find_resume(cfg.run.resume)
    state: dict[str, Any] = {"step": 0, "consumed_samples": 0, "health": None, "wandb_id": None}
    if resume_from is not None:
        client = ckpt.load(resume_from, engine=engine)
        meta = client.pop("meta")
        state.update({k: client.get(k, meta.get(k)) for k in state})
        state["wandb_id"] = meta.get("wandb_id")
    health = HealthMonitor(max_consecutive_nonfinite=cfg.train.max_consecutive_nonfinite,
                           spike_factor=cfg.train.spike_factor)
    if state["health"]:
        health.load_state_dict(state["health"])

    loader = task.loader(train_ds, global_batch_size=cfg.train.global_batch_size,
                         micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp_size,
                         consumed_samples=state["consumed_samples"], eod=eod)
    # Rank 0 alone finds the peak (a measurement on the other ranks would compete with its own for the cores).
    peak, peak_source = peak_flops_per_device(run_dir, dtype=cfg.train.dtype,
                                              override_tflops=cfg.logging.peak_tflops,
                                              device_key=cfg.logging.gpu) if rank == 0 else (0.0, "")
    peak = broadcast_object(peak)
    throughput = Throughput(flops_per_token=model_flops_per_token(model_cfg, cfg.data.seq_len),
                            peak_flops=peak, devices=topo.world_size)
    logger = MetricsLogger(run_dir, total_steps=cfg.train.steps, config=cfg.to_dict(), enabled=rank == 0,
                           log_every=cfg.train.log_every, wandb=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, wandb_mode_setting=cfg.logging.wandb_mode,
                           wandb_id=state["wandb_id"], tensorboard=cfg.logging.tensorboard,
                           start_step=state["step"], print_fn=print_fn)
    start = state["step"]
    for message in ckpt.warnings:
        logger.log_event(f"warning: {message}")
    logger.log_event(
        f"run {run_dir}: model {model_cfg.name} ({model_cfg.num_params() / 1e6:.1f}M params), "
        f"world {topo.world_size} (tp {topo.tp_size} pp {topo.pp_size} dp {topo.dp_size}), "
        f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens/step, "
        + (f"resumed from {resume_from} at step {start}" if resume_from else "fresh start")
        + f"; peak {peak / 1e12:.2f} TFLOP/s/device ({peak_source})")

    def save(step: int) -> None:
        client = {"step": step, "consumed_samples": loader.consumed_samples, "health": health.state_dict()}
        meta = {**client, "config": cfg.to_dict(), "wandb_id": logger.wandb_id,
                "model_config": model_cfg.to_dict()}
        path = _guard("checkpoint save", lambda: ckpt.save(step=step, engine=engine, client_state=client,
                                                           meta=meta), rank=rank,
                      timeout_s=cfg.train.collective_timeout_s)
        logger.log_event(f"checkpoint step {step} -> {path}")

    preempt = PreemptionFlag().install()
    schedule = schedule_from_config(cfg)
    batches: Iterator[dict[str, torch.Tensor]] = iter(loader)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    last_loss, last_val, step, reason = float("nan"), None, start, "completed"
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            lr = schedule(step - 1)
            t0 = time.perf_counter()
            result = _guard("train_step", lambda lr=lr: engine.train_step(batches, lr), rank=rank,
                            timeout_s=cfg.train.collective_timeout_s)
            seconds = time.perf_counter() - t0
            event = health.observe(step, loss=float(result.loss), grad_norm=float(result.grad_norm),
                                   skipped=bool(result.skipped))
            last_loss = float(result.loss)
            logger.log_step({"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(result.grad_norm),
                             "tokens": tokens_per_step, **throughput.measure(tokens_per_step, seconds),
                             "peak_flops": peak, "consumed_samples": loader.consumed_samples,
                             "skipped": event == "skipped", "skipped_total": health.skipped_total,
                             "spike": event == "spike"})
            if valid_ds is not None and cfg.train.eval_every and (
                    step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                last_val = evaluate(cfg, engine, valid_ds, topo, eod, task=task)
                logger.log_validation(step=step, loss=last_val)
            _test_hang(rank, step)
            stop = _guard("all_reduce (pre-emption check)", lambda: any_rank(preempt.signum is not None), rank=rank,
                          timeout_s=cfg.train.collective_timeout_s)
            if stop or step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                save(step)
            if stop:
                signum = broadcast_object(preempt.signum or signal.SIGTERM)
                reason = f"preempted:{signal.Signals(signum).name}"
                logger.log_event(f"pre-empted ({signal.Signals(signum).name}) at step {step}: checkpoint saved; "
                                 "continue with --resume auto")
                break
        if reason == "completed":
            task.export(engine, model_cfg, run_dir / "final_model", rank=rank)
        ckpt.wait()  # the last checkpoint is published before the run reports its end
        barrier()
    finally:
        preempt.restore()
        logger.close()
    exit_code = EXIT_CODES[signal.Signals[reason.split(":")[1]]] if reason != "completed" else 0
    return RunResult(run_dir=run_dir, start_step=start, last_step=step, reason=reason, exit_code=exit_code,
                     last_loss=last_loss, last_val_loss=last_val, skipped_steps=health.skipped_total)


def evaluate(cfg: RunConfig, engine: Any, valid_ds: Any, topo: Any, eod: int, *, task: Any = None) -> float:
    """Mean validation loss over the same ``eval_batches`` held-out micro-batches every time."""
    mb = cfg.train.micro_batch_size
    loader = (task or PretrainTask()).loader(valid_ds, global_batch_size=mb * topo.dp_size, micro_batch_size=mb,
                                             dp_rank=topo.dp_rank, dp_size=topo.dp_size, consumed_samples=0,
                                             eod=eod)
    loss = _guard("eval_loss", lambda: engine.eval_loss(iter(loader), cfg.train.eval_batches),
                  rank=topo.global_rank, timeout_s=cfg.train.collective_timeout_s)
    return float(loss)


def export_final(engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
    """Consolidated native-format weights (config.json + model.safetensors) for generation and conversion."""
    state_dict = engine.consolidated_state_dict()  # collective under ZeRO-3 / PP: every rank calls it
    if rank == 0 and state_dict:
        from model.checkpoints.native import save_native

        save_native(state_dict, model_cfg, out_dir, overwrite=True)
    barrier()
