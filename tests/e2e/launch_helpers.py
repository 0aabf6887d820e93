"""Helpers for the launch end-to-end tests: free ports, torchrun processes that are always cleaned up, metrics.

    from tests.e2e.launch_helpers import Launched, free_port, read_steps, train_env
    with Launched.start(argv, log=tmp_path / "node0.log") as proc:   # killed (whole session) on exit
        proc.wait(timeout=120)
    losses = {r["step"]: r["loss"] for r in read_steps(run_dir)}

Every process is started in its own session so a teardown can stop torchrun *and* its workers by process
group (``os.killpg`` of that one group, never by name).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "pretrain" / "tiny_cpu.toml")


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train_env(**extra: str) -> dict[str, str]:
    """The environment of a test launch: one OpenMP thread per process, this interpreter's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TORCHELASTIC_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


class Launched:
    """A child process in its own session, its output in ``log``; ``stop()`` kills its whole process group."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    @classmethod
    def start(cls, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None,
              cwd: Path = REPO) -> Launched:
        with open(log, "wb") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env or train_env(),
                                    cwd=cwd, start_new_session=True)
        return cls(proc, log)

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.proc.args[:6]}... still running after {timeout:.0f} s; log "
                                 f"{self.log}:\n{self.output()[-3000:]}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """SIGKILL the session's process group (torchrun and every worker it started), then reap."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    """The ``"type": "train"`` records of ``run_dir/metrics.jsonl`` (a line cut mid-write is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "train":
            records.append(rec)
    return records


def wait_for(predicate: Callable[[], bool], *, timeout_s: float, what: str, poll_s: float = 0.2,
             alive: Launched | None = None) -> None:
    """Poll ``predicate``; AssertionError naming ``what`` on timeout or when ``alive`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if alive is not None and alive.proc.poll() is not None:
            raise AssertionError(f"process exited ({alive.proc.returncode}) before {what}; log "
                                 f"{alive.log}:\n{alive.output()[-3000:]}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def worker_pid(parent: int, *, rank: int) -> int | None:
    """The pid of the descendant of ``parent`` whose environment has ``RANK=<rank>`` (a torchrun worker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    stack = list(children.get(parent, []))
    while stack:
        pid = stack.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return pid
        stack.extend(children.get(pid, []))
    return None
