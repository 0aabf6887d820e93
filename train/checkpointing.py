"""Atomic, pre-emption-safe training checkpoints: publish by rename, keep-last-K, a ``latest`` pointer last.

    from train.checkpointing import CheckpointManager
    ckpt = CheckpointManager(run_dir, rank=rank, world_size=world, barrier=barrier, broadcast=bcast, keep_last=3)
    path = ckpt.save(step=50, engine=engine, client_state={...}, meta={...})   # every rank calls it
    found = ckpt.find_resume("auto")               # newest complete checkpoint or None
    client_state = ckpt.load(found, engine=engine) # restores engine state and this rank's RNG states

On disk (``RUN_DIR/checkpoints``)::

    step_00000050/            published: DeepSpeed files (engine.save), rng/rank_00000.pkl per rank,
                              meta.json (step, consumed_samples, config, code version, wandb id), COMPLETE
    .tmp-step_00000060-<n>/   being written (ignored by readers, removed at the next start)
    latest                    "step_00000050\n", replaced atomically (tmp + os.replace) after the rename

Write protocol: every rank writes its part into ``.tmp-step_N-<nonce>`` (the nonce comes from rank 0), files
are fsynced, barrier, then rank 0 writes meta.json and the ``COMPLETE`` marker, fsyncs, renames the directory
to ``step_N`` (atomic on POSIX), fsyncs the parent, and only then replaces ``latest``. Old checkpoints are
deleted only after the new one is published, and they are first renamed to ``.trash-*`` so a half-deleted
directory never carries a ``step_*`` name. A kill -9 at any moment therefore leaves every ``step_*`` directory
complete; ``find_resume("auto")`` takes the newest directory holding ``COMPLETE`` (``latest`` is a hint for
people and tools: a crash between the rename and the pointer update leaves it one checkpoint behind).

Test hook: ``LLAMA_TEST_SLOW_CHECKPOINT=SECONDS`` sleeps inside the temporary write (after the engine has
written its files), so a test can land a kill -9 in the middle of writing a checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
META = "meta.json"
LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def code_version() -> str:
    """``git describe --always --dirty`` of the repository, else the installed package version."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=repo, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return "package:" + version("llama-stack-train")
    except Exception:  # noqa: BLE001 - not installed as a package
        return "unknown"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(path: Path) -> bool:
    """A published checkpoint: named ``step_N``, holding the COMPLETE marker and a parseable meta.json."""
    if not STEP_RE.match(path.name) or not (path / COMPLETE).is_file():
        return False
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("step") == int(STEP_RE.match(path.name).group(1))


class CheckpointManager:
    """Save, find and load checkpoints under ``RUN_DIR/checkpoints`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path, *, rank: int = 0, world_size: int = 1, keep_last: int = 3,
                 barrier: Callable[[], None] | None = None,
                 broadcast: Callable[[Any], Any] | None = None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self._barrier = barrier or (lambda: None)
        self._broadcast = broadcast or (lambda obj: obj)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    # ---- listing -----------------------------------------------------------------------------------
    def published(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest_pointer(self) -> Path | None:
        try:
            name = (self.root / LATEST).read_text().strip()
        except OSError:
            return None
        path = self.root / name
        return path if STEP_RE.match(name) and is_complete(path) else None

    def find_resume(self, resume: str) -> Path | None:
        """``"none"`` -> None; ``"auto"`` -> newest complete checkpoint (or None); else that directory."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not is_complete(path):
                raise ValueError(f"--run.resume {resume}: not a complete checkpoint directory (needs step_N "
                                 f"with {COMPLETE} and {META}); use --resume auto or a path from {self.root}")
            return path
        complete = self.published()
        pointer = self.latest_pointer()
        if complete and (pointer is None or pointer.name < complete[-1].name):
            return complete[-1]  # `latest` missing/broken or one behind (crash between rename and pointer)
        return pointer

    def clean_leftovers(self) -> list[str]:
        """Remove ``.tmp-*`` / ``.trash-*`` directories of interrupted writes or deletions (rank 0, at start)."""
        removed: list[str] = []
        if self.rank != 0 or not self.root.is_dir():
            return removed
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    # ---- save --------------------------------------------------------------------------------------
    def save(self, *, step: int, engine: Any, client_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank must call it with the same ``step``."""
        nonce = self._broadcast(secrets.token_hex(4) if self.rank == 0 else None)
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{step_name(step)}-{nonce}"
        if self.rank == 0:
            tmp.mkdir(parents=True)
        self._barrier()
        engine.save(tmp, client_state)
        rng_dir = tmp / "rng"
        rng_dir.mkdir(exist_ok=True)
        with open(rng_dir / f"rank_{self.rank:05d}.pkl", "wb") as fh:
            pickle.dump(rng_state(), fh)
        slow = float(os.environ.get("LLAMA_TEST_SLOW_CHECKPOINT", "0") or 0)
        if slow > 0:
            time.sleep(slow)  # test hook: widen the window in which a kill lands mid-write
        self._barrier()
        if self.rank == 0:
            self._publish(tmp, final, step=step, meta=meta)
        self._barrier()
        return final

    def _publish(self, tmp: Path, final: Path, *, step: int, meta: dict[str, Any]) -> None:
        full_meta = {"step": step, "code_version": code_version(), "world_size": self.world_size,
                     "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
        (tmp / META).write_text(json.dumps(full_meta, indent=2, default=str) + "\n")
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
        if final.exists():  # the same step again after a resume from an older checkpoint
            self._discard(final)
        os.rename(tmp, final)
        _fsync(self.root)
        _write_atomic(self.root / LATEST, final.name + "\n")
        for old in self.published()[: -self.keep_last]:
            self._discard(old)

    def _discard(self, path: Path) -> None:
        trash = self.root / f".trash-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)  # atomic: a half-deleted directory never keeps its step_* name
        _fsync(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    # ---- load --------------------------------------------------------------------------------------
    def load(self, path: Path, *, engine: Any) -> dict[str, Any]:
        """Restore the engine and this rank's RNG states; returns the engine's client_state plus ``meta``."""
        client_state = dict(engine.load(path) or {})
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pkl"
        if rng_file.is_file():
            with open(rng_file, "rb") as fh:
                set_rng_state(pickle.load(fh))  # our own file, written by save() above
        client_state["meta"] = read_meta(path)
        return client_state


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())
