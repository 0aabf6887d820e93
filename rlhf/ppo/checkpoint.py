"""PPO checkpoints through the machinery every stage uses (``train/checkpointing.py``): atomic, ``latest``
last, one shard file per rank, optionally written in the background; resume at any data-parallel size.

    ckpt = checkpoint_manager(cfg, topo)                   # a train.checkpointing.CheckpointManager
    state = resume(ckpt, cfg.run.resume, roles=TrainedRoles(policy=p, value=v), guards=g, stopper=s)
    save(ckpt, state, roles=..., guards=g, stopper=s, config=cfg)   # every rank, at an iteration boundary

What a checkpoint holds (``RUN_DIR/checkpoints/step_<iteration>``)::

    policy/  value/     each trained role's shard per rank (fp32 master weights + Adam moments of its ZeRO
                        fragment, train/engine_checkpoint.py), readable at any TP x DP layout
    rng/ manifests/     every rank's RNG states and file records (CheckpointManager)
    meta.json           "ppo": iteration, guards and early-stopping state, the stop reason if the run stopped

What is NOT saved because it is a pure function of (seed, iteration) or of files that do not change: the prompt
order (``iteration_prompts``), each answer's sampling seed (``rollout.answer_seed``), the held-out seeds, the
frozen reference and reward models. The metrics position is the iteration: ``metrics.jsonl`` is cut back to it
on resume. So a resumed run repeats the uninterrupted one bit for bit on CPU in fp32
(``tests/e2e/test_ppo_resume.py`` kills one five times).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import comm
from train.checkpointing import CheckpointError, CheckpointManager

ROLES = ("policy", "value")
"""The trained roles, each in its own subdirectory of a checkpoint."""


class TrainedRoles:
    """The policy and value engines as the one engine ``CheckpointManager`` saves: each role's files under its
    own subdirectory, staged together (both shards copied to host memory before ``save`` returns)."""

    def __init__(self, **engines: Any) -> None:
        self.engines = engines

    def stage_save(self, checkpoint_dir: Path, client_state: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        writers = {}
        for role, engine in self.engines.items():
            stage = getattr(engine, "stage_save", None)
            if stage is not None:
                writers[role] = stage(Path(checkpoint_dir) / role, client_state)
            else:  # an engine without asynchronous staging (test engines) writes now
                records = engine.save(Path(checkpoint_dir) / role, client_state) or {}
                writers[role] = lambda records=records: records

        def write() -> dict[str, Any]:
            return {f"{role}/{name}": record for role, w in writers.items() for name, record in w().items()}

        return write

    def save(self, checkpoint_dir: Path, client_state: dict[str, Any]) -> dict[str, Any]:
        return self.stage_save(checkpoint_dir, client_state)()

    def load(self, checkpoint_dir: Path) -> dict[str, Any]:
        for role, engine in self.engines.items():
            if not (Path(checkpoint_dir) / role).is_dir():
                raise CheckpointError(f"{checkpoint_dir}: no {role}/ directory; not a PPO checkpoint (written by "
                                      "python -m rlhf.ppo). Resume a PPO run from its own run directory")
            engine.load(Path(checkpoint_dir) / role)
        return {}


@dataclass
class PPOState:
    """Where a run stands: the last finished iteration and, once the loop ended early, why."""

    iteration: int = 0
    stopped: str = ""
    """"" while running; "early_stop" / "alarm" once the loop ended (a resume then only exports)."""
    resumed_from: Path | None = None


SETTINGS = frozenset({"cfg", "patience", "min_delta"})
"""Fields of the guards / early stopping that come from the config (a resume takes them from the new config)."""


def _fields(obj: Any) -> dict[str, Any]:
    """A guard's counters (its dataclass fields but the settings) as JSON values."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in SETTINGS}


def _restore(obj: Any, saved: dict[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(obj)} - SETTINGS
    for name, value in saved.items():
        if name in SETTINGS:
            continue  # a setting: the resumed run's config decides
        if name not in names:
            raise CheckpointError(f"PPO checkpoint: {what} has no field {name!r} in this version of the code; "
                                  "resume with the version that wrote it")
        setattr(obj, name, value)


def checkpoint_manager(cfg: Any, topo: Any) -> CheckpointManager:
    return CheckpointManager(cfg.run.dir, rank=topo.global_rank, world_size=topo.world_size,
                             keep_last=cfg.checkpoint.keep_last, barrier=comm.barrier,
                             broadcast=comm.broadcast_object, all_gather=comm.all_gather_object,
                             async_save=cfg.checkpoint.async_save, publish_timeout_s=cfg.train.collective_timeout_s)


def resume(ckpt: CheckpointManager, mode: str, *, roles: TrainedRoles, guards: Any, stopper: Any) -> PPOState:
    """Restore the trained roles, RNG states, guards and early stopping from the checkpoint ``mode`` names
    (``--run.resume``: none / auto / auto-or-fresh / a directory); a fresh ``PPOState`` when there is none."""
    ckpt.clean_leftovers()
    path = ckpt.find_resume(mode)
    if path is None:
        return PPOState()
    meta = ckpt.load(path, engine=roles)["meta"]
    ppo = meta.get("ppo")
    if not isinstance(ppo, dict):
        raise CheckpointError(f"{path}: meta.json has no 'ppo' state; not a checkpoint of python -m rlhf.ppo")
    _restore(guards, ppo["guards"], "guards")
    _restore(stopper, ppo["stopper"], "early stopping")
    return PPOState(iteration=int(ppo["iteration"]), stopped=ppo.get("stopped", ""), resumed_from=path)


def save(ckpt: CheckpointManager, state: PPOState, *, roles: TrainedRoles, guards: Any, stopper: Any,
         config: Any) -> Path:
    """Collective: checkpoint the end of iteration ``state.iteration`` (published in the background)."""
    ppo = {"iteration": state.iteration, "stopped": state.stopped, "guards": _fields(guards),
           "stopper": _fields(stopper)}
    meta = {"ppo": ppo, "config": config.to_dict()}
    return ckpt.save(step=state.iteration, engine=roles, client_state={}, meta=meta)
