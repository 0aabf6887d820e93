"""Worker for tests/e2e/test_distill_tiny.py: several ``rlhf.distill`` layouts in one torchrun launch.

    torchrun --standalone --nproc-per-node 2 tests/e2e/run_distill_layouts.py OUT NAME=OVERRIDES ...

Each ``NAME=--distill.teacher_tp=2`` runs ``run_distill`` (DeepSpeed engine, megatron-core layers) on the test's
``distill_args(OUT, NAME)`` plus the comma-separated overrides, into ``OUT/NAME``. One launch saves the start-up
(imports, process group) of a second torchrun.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from rlhf.distill.config import DistillConfig
    from rlhf.distill.train import DistillTask, run_distill
    from rlhf.stage import rank, world_size
    from tests.e2e.test_distill_tiny import distill_args

    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, _, overrides = spec.partition("=")
        cfg = DistillConfig.from_toml(None, distill_args(out, name, *(o for o in overrides.split(",") if o)))
        task = DistillTask(cfg)
        task.resolve(world_size=world_size())
        result, _ = run_distill(task.cfg, task=task, print_fn=lambda *a, **k: None)
        if rank() == 0:  # what the student's engine ran, for the sequence-parallel check
            (out / name / "sequence_parallel.json").write_text(json.dumps(bool(getattr(result, "sequence_parallel", False))))
        if result.reason != "completed":
            raise SystemExit(f"layout {name}: {result.reason}")


if __name__ == "__main__":
    main()
