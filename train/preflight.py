"""Pre-flight: before any allocation (model, optimizer, data index), does the run fit this machine?

    check_memory(cfg, model_cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))   # ConfigError when not

The estimate is the training state of one process (``state_bytes_per_process``): weights, gradients and AdamW
states of its TP x PP share of the parameters, divided by ZeRO as its stage shards them. That is 16 bytes per
parameter unsharded (fp32: 4 weights + 4 grads + 8 Adam; bf16: 2 + 2 + 4 master + 8 Adam), the figure of
``python -m launch plan`` without activations: a lower bound, so a refusal is certain, a pass is not a promise.
The machine's memory: the GPU's total memory on CUDA, else the RAM (``/proc/meminfo`` MemTotal, or the cgroup
limit when lower) shared by the processes of this node (``LOCAL_WORLD_SIZE``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from train.config_reader import ConfigError

GIB = 1024**3


def state_bytes_per_process(model_cfg: Any, *, tp: int, pp: int, dp: int, zero_stage: int, dtype: str,
                            offload: bool = False) -> float:
    """Weights + grads + optimizer states of one process's parameters, in bytes (see the module docstring)."""
    params = model_cfg.num_params() / (tp * pp)
    width = 2 if dtype == "bf16" else 4
    master = 4 if dtype == "bf16" else 0  # fp32 master weights next to the bf16 ones
    weights = width * params / (dp if zero_stage >= 3 else 1)
    grads = width * params / (dp if zero_stage >= 2 else 1)
    optimizer = 0.0 if offload else (8 + master) * params / (dp if zero_stage >= 1 else 1)
    return weights + grads + optimizer


def machine_memory() -> tuple[float, str]:
    """(bytes one process may use, what it is) on this machine."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), f"GPU memory of {props.name}"
    total = _meminfo_total()
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        total = limit
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = f" shared by {local} processes" if local > 1 else ""
    return total / local, f"CPU RAM{share}"


def _meminfo_total() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cgroup_limit() -> float | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return float(text)
    return None


def check_memory(cfg: Any, model_cfg: Any, *, world_size: int) -> None:
    """Refuse (``ConfigError``, with the estimate, the machine's figure and the fix) when the training state of
    one process alone exceeds this machine's memory for it."""
    if not cfg.train.preflight:
        return
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = max(1, world_size // (tp * pp))
    need = state_bytes_per_process(model_cfg, tp=tp, pp=pp, dp=dp, zero_stage=cfg.zero.stage,
                                   dtype=cfg.train.dtype, offload=cfg.zero.offload)
    have, what = machine_memory()
    if need <= have:
        return
    per_param = need / (model_cfg.num_params() / (tp * pp))
    raise ConfigError(
        f"model.name={model_cfg.name!r} ({model_cfg.num_params() / 1e9:.2f}B parameters) needs ~{need / GIB:.0f} GiB "
        f"per process here for weights, gradients and AdamW states alone ({per_param:.0f} B/param at tp={tp} "
        f"pp={pp} dp={dp} ZeRO-{cfg.zero.stage}, {cfg.train.dtype}); this machine has {have / GIB:.0f} GiB "
        f"({what}). Use a smaller model (--model.name debug_15m), or launch on GPUs with enough of them to shard it "
        f"(see `python -m launch plan {model_cfg.name}`), or pass --train.preflight=false to try anyway")
