"""Compile ``cpu_kernels.c`` with the system C compiler on first use, cache the library, load it with ctypes.

    lib = load()            # a ctypes.CDLL, or None when no compiler / the build fails (reason in ``last_error``)

The library is plain C (no torch headers), so a build takes about a second. It is built for this CPU
(``-march=native``) and cached under ``$LLAMA_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/llama-stack/kernels``,
else ``~/.cache/...``) by a hash of the source, the compiler command and this CPU's model and feature flags,
so nodes of a cluster with a shared home directory but different CPUs never load each other's builds.
Concurrent first uses (every rank of a ``torchrun`` job) each compile to a private temporary file and publish
it with an atomic rename: a reader never sees a half-written library.

``LLAMA_CPU_KERNELS=0`` turns the fused kernels off (the model then runs its eager PyTorch formulas).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared",
         "-fPIC"]

_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
SIGNATURES: dict[str, list[type]] = {
    "rms_norm_forward": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _F32, _INT],
    "rms_norm_backward": [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _INT],
    "rope_qk_forward": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _INT],
    "rope_qk_backward": [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64,
                         _I64, _INT],
    "swiglu_forward": [_PTR, _PTR, _I64, _I64, _INT],
    "swiglu_backward": [_PTR, _PTR, _PTR, _I64, _I64, _INT],
    "causal_softmax_forward": [_PTR, _I64, _I64, _I64, _I64, _F32, _PTR, _I64, _I64, _INT],
    "causal_softmax_backward": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _F32, _INT],
}

last_error: str | None = None
"""Why the last ``load()`` returned None (shown once by the caller), or None."""

_loaded: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    explicit = os.environ.get("LLAMA_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama-stack" / "kernels"


def _cpu_identity() -> str:
    """CPU model and feature flags (what ``-march=native`` depends on)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted))) or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def library_path(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_identity()]).encode()).hexdigest()
    return cache_dir() / f"cpu_kernels-{key[:20]}.so"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} {' '.join(FLAGS)} {SOURCE} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None with the reason in ``last_error``."""
    global _loaded, _tried, last_error
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get("LLAMA_CPU_KERNELS", "1") == "0":
        last_error = "LLAMA_CPU_KERNELS=0"
        return None
    compiler = _compiler()
    if compiler is None:
        last_error = "no C compiler (cc, gcc or clang) on PATH"
        return None
    try:
        import torch  # noqa: F401  (loads torch's libgomp first, so the library shares its OpenMP runtime)

        target = library_path(compiler)
        if not target.exists():
            _compile(compiler, target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:  # an unreadable cached file (a truncated copy, a foreign build): rebuild it once
            _compile(compiler, target)
            lib = ctypes.CDLL(str(target))
        for name, argtypes in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        last_error = f"fused CPU kernels unavailable: {err}"
        return None
    _loaded = lib
    return lib
