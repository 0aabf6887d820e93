"""Measure a PPO process's peak resident memory (VmHWM) by phase, to check the CPU PPO plan against.

    MALLOC_MMAP_THRESHOLD_=131072 torchrun --standalone --nproc-per-node 2 -m launch.ppo_rss OUT_DIR \\
        --config configs/rlhf/ppo_tiny.toml --model.name=bench_25m --zero.stage=3 --ppo.iterations=1 ...

Runs ``python -m rlhf.ppo`` with the given arguments in this process and writes ``OUT_DIR/rank<R>.json``:
the peak resident bytes of each phase (``construction``: imports and building the five roles; ``rollout``,
``scoring``, ``training`` as ``rlhf/ppo/trainer.py`` runs them; ``other``: what runs between them, e.g. a
checkpoint or the export), the resident bytes after construction, and ``peak`` (the largest of all, i.e. the
process's VmHWM). Each phase's peak is read by resetting the kernel's high-water mark (``/proc/self/clear_refs``
``5``, Linux >= 4.0) before it and reading ``VmHWM`` after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PHASES = {"_rollout": "rollout", "make_experience": "scoring", "update": "training"}
"""PPOTrainer methods -> the phase each one is (held-out evaluation also samples through ``_rollout``)."""


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} line: the measurement needs Linux")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


class PhasePeaks:
    """Peak resident bytes per phase; whatever runs outside a named phase counts as ``other``."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.history: list[tuple[str, int]] = []
        """Every phase's peak in the order they ran."""

    def _close(self, name: str) -> None:
        peak = _status("VmHWM")
        self.peaks[name] = max(self.peaks.get(name, 0), peak)
        self.history.append((name, peak))
        _reset_peak()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._close("other")
        try:
            yield
        finally:
            self._close(name)

    def wrap(self, obj: Any, method: str, name: str) -> None:
        inner = getattr(obj, method)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return inner(*args, **kwargs)

        setattr(obj, method, wrapped)


def measure(out_dir: Path, argv: list[str]) -> dict[str, Any]:
    """Run PPO with ``argv`` (the flags of ``python -m rlhf.ppo``) and return this rank's phase peaks."""
    import argparse
    import warnings

    from rlhf.ppo import checkpoint as ck
    from rlhf.ppo.config import PPOConfig
    from rlhf.ppo.trainer import PPOTrainer
    from train.config_reader import add_config_arguments

    parser = argparse.ArgumentParser(prog="python -m launch.ppo_rss")
    add_config_arguments(parser, PPOConfig, prog="python -m launch.ppo_rss", example="OUT_DIR --config configs/rlhf/ppo_tiny.toml")
    args, overrides = parser.parse_known_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    peaks, save = PhasePeaks(), ck.save
    with peaks.phase("construction"):
        trainer = PPOTrainer(PPOConfig.from_toml(args.config, overrides))
    resident = _status("VmRSS")
    for method, name in PHASES.items():
        peaks.wrap(trainer, method, name)
    peaks.wrap(trainer, "export", "export")
    peaks.wrap(ck, "save", "checkpoint")  # the trainer calls it through the module: unwrapped again below
    try:
        trainer.run()
    finally:
        ck.save = save
    peaks._close("other")
    rank = trainer.topo.global_rank
    result = {"rank": rank, "world_size": trainer.topo.world_size, "tp": trainer.topo.tp_size,
              "dp": trainer.topo.dp_size, "phases": peaks.peaks, "history": peaks.history, "resident_after_construction": resident,
              "peak": max(peaks.peaks.values()),
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "")}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m launch.ppo_rss OUT_DIR [python -m rlhf.ppo flags]", file=sys.stderr)
        return 2
    measure(Path(argv[0]), argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
