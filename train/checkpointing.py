"""Atomic, verified, optionally asynchronous training checkpoints: publish by rename, keep-last-K, ``latest`` last.

    from train.checkpointing import CheckpointManager
    ckpt = CheckpointManager(run_dir, rank=rank, world_size=world, barrier=barrier, broadcast=bcast,
                             all_gather=gather, keep_last=3, async_save=True)
    ckpt.save(step=50, engine=engine, client_state={...}, meta={...})   # every rank; returns after the copy
    ckpt.wait()                                    # this rank's background write (and rank 0's publish) done
    found = ckpt.find_resume("auto")               # newest *intact* checkpoint, or None, or CheckpointError
    client_state = ckpt.load(found, engine=engine) # restores engine state and this rank's RNG states

On disk (``RUN_DIR/checkpoints``)::

    step_00000050/            published: the engine's files, rng/rank_00000.json, manifests/rank_00000.json per
                              rank, meta.json (step, counters, config, code version, "files": size + SHA-256
                              of every file), COMPLETE (holding meta.json's SHA-256)
    .tmp-step_00000060-<n>/   being written (ignored by readers, removed at the next start)
    damaged-step_00000040-<n>/ failed verification at a resume: kept for inspection, never resumed from
    latest                    "step_00000050\\n", replaced atomically (tmp + os.replace) after the rename

Write protocol: every rank writes its part into ``.tmp-step_N-<nonce>`` (nonce from rank 0) and then its
manifest (the files it wrote with size and SHA-256, computed while writing). Rank 0 waits for all manifests,
writes meta.json and ``COMPLETE``, fsyncs, renames the directory to ``step_N`` (atomic on POSIX), fsyncs the
parent, and only then replaces ``latest``; old checkpoints are renamed to ``.trash-*`` before deletion. A
kill -9 at any moment therefore leaves every ``step_*`` directory complete and ``latest`` on one of them.

Asynchronous save (``async_save=True``, like torch DCP ``async_save`` and Megatron ``--async-save``): if the
engine offers ``stage_save(dir, client_state) -> write``, ``save`` returns once ``stage_save`` has copied this
rank's shard to host memory; ``write()`` (files + fsync), the manifest and rank 0's publication run in a
background thread, with no collective in it (ranks meet through the manifests on the shared filesystem).
The next ``save`` and ``wait()`` join it; a failure in it is raised there. Engines without ``stage_save``
save synchronously and only the publication is in the background.

Resume (``find_resume``): ``"auto"`` tries complete checkpoints newest first; each is verified (sizes of all
files, checksums spread over the ranks, agreed by all ranks). A damaged one is renamed ``damaged-*`` with a
warning naming the file, and the previous one is tried. If none is intact: no checkpoint at all -> start
fresh; only damaged ones -> ``CheckpointError`` (exit 2 with the reason) unless ``"auto-or-fresh"``, which
starts fresh. Either way a requeued job never picks the same broken checkpoint again.

Test hook: ``LLAMA_TEST_SLOW_CHECKPOINT=SECONDS`` sleeps inside the (background) write, after the engine has
written its files, so a test can land a kill -9 in the middle of writing a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.checkpoint_files import (
    COMPLETE,
    META,
    RNG_DIR,
    read_json_file,
    read_manifest,
    rng_state_json,
    seal,
    set_rng_state_json,
    unclaimed_files,
    verify_checkpoint,
    write_json_atomic,
    write_manifest,
)
from train.config_reader import ConfigError

STEP_RE = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
RESUME_MODES = ("none", "auto", "auto-or-fresh")


class CheckpointError(ConfigError):
    """No checkpoint to resume from that is intact (the message names the damaged ones and the fix)."""


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
    """Save, find, verify and load checkpoints under ``RUN_DIR/checkpoints`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path, *, rank: int = 0, world_size: int = 1, keep_last: int = 3,
                 barrier: Callable[[], None] | None = None, broadcast: Callable[[Any], Any] | None = None,
                 all_gather: Callable[[Any], list[Any]] | None = None, async_save: bool = False,
                 publish_timeout_s: float = 1800.0, warn: Callable[[str], None] | None = None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.async_save, self.publish_timeout_s = async_save, publish_timeout_s
        self._barrier = barrier or (lambda: None)
        self._broadcast = broadcast or (lambda obj: obj)
        # Without an all-gather (one process, or a caller that has none) each rank verifies every checksum.
        self._all_gather = all_gather
        self._warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        self.warnings: list[str] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    # ---- listing -----------------------------------------------------------------------------------
    def published(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)

    def damaged(self) -> list[Path]:
        """Checkpoints set aside by an earlier failed verification."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith("damaged-"))

    def latest_pointer(self) -> Path | None:
        try:
            name = (self.root / LATEST).read_text().strip()
        except OSError:
            return None
        path = self.root / name
        return path if STEP_RE.match(name) and is_complete(path) else None

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

    # ---- resume ------------------------------------------------------------------------------------
    def find_resume(self, resume: str) -> Path | None:
        """``"none"`` -> None; ``"auto"``/``"auto-or-fresh"`` -> newest intact checkpoint; else that directory."""
        if resume == "none":
            return None
        if resume not in RESUME_MODES:
            path = Path(resume)
            if not is_complete(path):
                raise CheckpointError(f"--run.resume {resume}: not a complete checkpoint directory (needs step_N "
                                 f"with {COMPLETE} and {META}); use --resume auto or a path from {self.root}")
            problems = self.verify(path)
            if problems:
                raise CheckpointError(f"--run.resume {resume}: the checkpoint is damaged: {'; '.join(problems[:3])}"
                                      f"; resume from another one (--resume auto picks the newest intact one)")
            return path
        for candidate in reversed(self.published()):
            problems = self.verify(candidate)
            if not problems:
                return candidate
            self._set_aside(candidate, problems)
        damaged = self.damaged()
        if not damaged:
            return None  # a first start: nothing saved yet
        names = ", ".join(p.name for p in damaged)
        if resume == "auto-or-fresh":
            self._note(f"no intact checkpoint in {self.root} (damaged: {names}); starting fresh as asked "
                       "(--resume auto-or-fresh)")
            return None
        raise CheckpointError(f"no intact checkpoint to resume from in {self.root}: {names} failed verification "
                              "(see the warnings above). Pass --resume auto-or-fresh to start fresh, or repair / "
                              "remove them.")

    def verify(self, path: Path) -> list[str]:
        """Problems of ``path`` found by any rank (the same list on every rank); empty when intact."""
        if self._all_gather is None or self.world_size == 1:
            return verify_checkpoint(path)
        found = self._all_gather(verify_checkpoint(path, share=(self.rank, self.world_size)))
        return sorted({p for problems in found for p in problems})

    def _set_aside(self, path: Path, problems: list[str]) -> None:
        aside = self.root / f"damaged-{path.name}-{int(time.time())}"
        self._note(f"skipping damaged checkpoint {path}: {'; '.join(problems[:3])}"
                   + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
                   + f"; moved to {aside.name}, falling back to the previous checkpoint")
        if self.rank == 0:
            os.rename(path, aside)
            _fsync(self.root)
            if self.latest_pointer() is None and self.published():
                _write_atomic(self.root / LATEST, self.published()[-1].name + "\n")
        self._barrier()

    def _note(self, message: str) -> None:
        self.warnings.append(message)
        if self.rank == 0:
            self._warn(message)

    # ---- save --------------------------------------------------------------------------------------
    def save(self, *, step: int, engine: Any, client_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it with the same ``step``. Returns the final path (published later
        when asynchronous: ``wait()``)."""
        self.wait()
        nonce = self._broadcast(secrets.token_hex(4) if self.rank == 0 else None)
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{step_name(step)}-{nonce}"
        if self.rank == 0:
            tmp.mkdir(parents=True)
        self._barrier()
        rng = rng_state_json()
        stage = getattr(engine, "stage_save", None)
        if self.async_save and stage is not None:
            write = stage(tmp, client_state)  # copies this rank's shard to host memory; returns the writer
        else:
            records = engine.save(tmp, client_state) or {}
            write = lambda: records  # noqa: E731 - already written
        full_meta = {"step": step, "code_version": code_version(), "world_size": self.world_size,
                     "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
        job = lambda: self._write_and_publish(tmp, final, write=write, rng=rng, meta=full_meta)  # noqa: E731
        if self.async_save:
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint-{step}")
            self._thread.start()  # not a daemon: the interpreter finishes the write before exiting
        else:
            job()
            self._barrier()
        return final

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until this rank's pending write (and, on rank 0, the publication) is done; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"background checkpoint write failed on rank {self.rank}: {error}") from error

    def _write_and_publish(self, tmp: Path, final: Path, *, write: Callable[[], dict], rng: dict[str, Any],
                           meta: dict[str, Any]) -> None:
        try:
            records = dict(write())
            rng_file = f"{RNG_DIR}/rank_{self.rank:05d}.json"
            write_json_atomic(tmp / rng_file, rng)
            slow = float(os.environ.get("LLAMA_TEST_SLOW_CHECKPOINT", "0") or 0)
            if slow > 0:
                time.sleep(slow)  # test hook: widen the window in which a kill lands mid-write
            write_manifest(tmp, rank=self.rank, files=records)
        except BaseException as err:
            write_manifest(tmp, rank=self.rank, error=f"{type(err).__name__}: {err}")
            raise
        if self.rank == 0:
            self._publish(tmp, final, meta=meta)

    def _collect_manifests(self, tmp: Path) -> dict[str, Any]:
        """Every rank's file records, waiting for ranks still writing (up to ``publish_timeout_s``)."""
        files: dict[str, Any] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + self.publish_timeout_s
        while pending:
            for rank in sorted(pending):
                manifest = read_manifest(tmp, rank)
                if manifest is None:
                    continue
                if manifest.get("error"):
                    raise RuntimeError(f"rank {rank} failed to write its part of {tmp.name}: {manifest['error']}")
                files.update(manifest["files"])
                pending.discard(rank)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"{tmp}: rank(s) {sorted(pending)[:8]} did not finish writing within "
                                   f"{self.publish_timeout_s:.0f} s; the checkpoint is not published")
            if pending:
                time.sleep(0.05)
        return files

    def _publish(self, tmp: Path, final: Path, *, meta: dict[str, Any]) -> None:
        files = self._collect_manifests(tmp)
        for name, record in unclaimed_files(tmp, set(files)).items():
            files[name] = record.to_dict()
        _fsync_tree(tmp)
        seal(tmp, {**meta, "files": dict(sorted(files.items()))})
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
        """Restore the engine and this rank's RNG states; returns the engine's client_state plus ``meta``.
        A file that is not what this program writes (a pickle, a truncated header) is a ``CheckpointError``."""
        try:
            client_state = dict(engine.load(path) or {})
            rng_file = path / RNG_DIR / f"rank_{self.rank:05d}.json"
            if rng_file.is_file():
                set_rng_state_json(read_json_file(rng_file), source=rng_file)
        except CheckpointError:
            raise
        except (ValueError, FileNotFoundError) as err:
            raise CheckpointError(f"cannot resume from {path}: {err}") from err
        if not rng_file.is_file() and (path / RNG_DIR / f"rank_{self.rank:05d}.pkl").is_file():
            self._note(f"{path / RNG_DIR}: RNG state saved as a pickle by an older version; not read (pickles can "
                       "run code), so this rank's random streams restart from the seed")
        client_state["meta"] = read_meta(path)
        return client_state


def read_meta(path: str | Path) -> dict[str, Any]:
    return read_json_file(Path(path) / META)
