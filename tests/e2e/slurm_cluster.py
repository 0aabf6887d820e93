"""A real one-node SLURM cluster on localhost for end-to-end tests: munged + slurmctld + slurmd under a temp dir.

    from tests.e2e.slurm_cluster import SlurmCluster, SlurmUnavailable
    with SlurmCluster.start() as cluster:          # SlurmUnavailable (with the reason) if it cannot run here,
                                                   # SlurmStartError (with the daemon logs) if they fail
        job = cluster.sbatch(script, cwd=repo)     # job id
        cluster.wait_state(job, {"COMPLETED"}, timeout_s=120)

Installation is not done here: ``launch/ci/install_slurm.sh`` (Debian's slurm-wlm 22.05 + munge, called from
``.ci/run``). Everything else is private to the cluster's directory, nothing under /etc is read or written:
a fresh munge key and munged socket (``AuthInfo=socket=...``), a ``slurm.conf`` on free ports with state, spool,
pid and log files under the directory, and ``SLURM_CONF`` in ``cluster.env`` for the client commands and for the
jobs (sbatch exports the submitting environment). The daemons run in the foreground as our child processes and
are stopped by PID at teardown after the queue is drained. Why the directory is not pytest's ``tmp_path``:
munged insists that every directory above its socket is world-executable, and ``/tmp/pytest-of-root`` is 0700.

Slurm behaviour the tests rely on (22.05): a requeued job waits in PENDING (Reason=BeginTime) for about two
minutes before it may start again; ``release_begin_time`` sets StartTime=now so a test need not wait.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
INSTALL_HINT = "install with launch/ci/install_slurm.sh (as root: apt-get install slurm-wlm munge)"


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster (binaries missing, not root); the test skips with the reason."""


class SlurmStartError(RuntimeError):
    """The daemons were there but did not come up: a failure (with their logs), never a skip."""


def _which(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.hostname = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del self.env[var]  # a test run inside a SLURM job must not leak that job's settings

    # ---- lifecycle -------------------------------------------------------------------------------------
    @classmethod
    def start(cls, *, startup_timeout_s: float = 30.0) -> SlurmCluster:
        missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
        if missing:
            raise SlurmUnavailable(f"SLURM/munge binaries not found ({', '.join(missing)}); {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs slurmd/slurmctld as root (SlurmUser=root); not root here")
        root = Path(tempfile.mkdtemp(prefix="llama-slurm-"))
        root.chmod(0o755)
        cluster = cls(root)
        try:
            cluster._start_daemons(startup_timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _start_daemons(self, timeout_s: float) -> None:
        r = self.root
        for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o700), ("spool", 0o755), ("log", 0o755)):
            (r / sub).mkdir()
            (r / sub).chmod(mode)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = r / "run" / "munge.socket"
        # munged may run as root with private paths; -F keeps it our child so it is stopped by PID.
        self._spawn("munged", [_which("munged"), "-F", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={r / 'run' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}",
                               f"--log-file={r / 'log' / 'munged.log'}"])
        self._wait(lambda: socket_path.exists(), "munged", timeout_s, r / "log" / "munged.stdout")
        self.conf.write_text(self._slurm_conf(socket_path))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.hostname])
        self._wait(self._node_idle, "slurmctld/slurmd (node idle in sinfo)", timeout_s,
                   r / "log" / "slurmctld.log", r / "log" / "slurmd.log")

    def _slurm_conf(self, socket_path: Path) -> str:
        r = self.root
        mem_mb = max(1024, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024)
        # FirstJobId: the generated script derives MASTER_PORT from the job id; vary it between test runs.
        first_job = 1000 + int.from_bytes(os.urandom(2), "little") % 15000
        return f"""\
ClusterName=llamatest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
FirstJobId={first_job}
# SIGTERM -> SIGKILL grace: a requeued run checkpoints within it (60 s leaves room on a loaded machine)
KillWait=60
MinJobAge=600
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _wait(self, ready, what: str, timeout_s: float, *logs: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            if ready():
                return
            time.sleep(0.3)
        else:
            dead = []
        detail = "\n".join(f"--- {p.name}:\n{_tail(p)}" for p in (*logs, *(self.root / "log" / f"{n}.stdout"
                                                                       for n in dead)))
        state = f"exited: {', '.join(dead)}" if dead else f"not ready after {timeout_s:.0f} s"
        raise SlurmStartError(f"could not start {what} ({state}); logs under {self.root}:\n{detail}")

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env,
                             check=False)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def stop(self) -> None:
        """Cancel every job, wait for the node to drain (job processes are slurmstepd's, not ours), stop by PID."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True,
                           check=False, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.squeue_ids():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if os.environ.get("LLAMA_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- client helpers --------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, cwd: Path | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        out = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, cwd=cwd, timeout=timeout,
                             check=False)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def sbatch(self, script: Path, *, cwd: Path) -> str:
        return self.run("sbatch", "--parsable", str(script), cwd=cwd).stdout.strip().split(";")[0]

    def squeue_ids(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i", check=False)
        return out.stdout.split() if out.returncode == 0 else []

    def job_info(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, RunTime, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait_state(self, job: str, states: Iterable[str], *, timeout_s: float, poll_s: float = 0.5,
                   on_poll=None) -> dict[str, str]:
        """Poll until JobState is one of ``states``; TimeoutError with the last seen info otherwise."""
        wanted = set(states)
        deadline, info = time.monotonic() + timeout_s, {}
        while time.monotonic() < deadline:
            info = self.job_info(job)
            if info.get("JobState") in wanted:
                return info
            if on_poll is not None:
                on_poll(info)
            time.sleep(poll_s)
        raise TimeoutError(f"job {job} not in {sorted(wanted)} after {timeout_s:.0f} s; last: "
                           f"{ {k: info.get(k) for k in ('JobState', 'Reason', 'Restarts', 'ExitCode')} }")

    def release_begin_time(self, job: str) -> None:
        """A requeued job is held ~120 s (Reason=BeginTime); let it start now."""
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    def logs(self) -> str:
        return "\n".join(f"--- {n}:\n{_tail(self.root / 'log' / n, 30)}" for n in ("slurmctld.log", "slurmd.log"))
