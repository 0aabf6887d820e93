"""Worker for the distributed parity tests: run several layouts of the real training loop in one launch.

    torchrun --standalone --nproc-per-node 2 tests/distributed/run_layouts.py OUT_DIR NAME=OVERRIDES ...

Each ``NAME=--a.b=1,--c.d=2`` runs ``train.loop.train`` (DeepSpeed engine, megatron-core layers) on the
parity config with those overrides, into ``OUT_DIR/NAME``. One launch serves many layouts because each
launch costs seconds; the process groups are rebuilt between layouts whose TP/PP sizes differ.
The token ``@eager`` among the overrides runs that layout on the eager PyTorch formulas (the GPU path) inside
``model.kernels.disabled()``: the in-process form of ``LLAMA_CPU_KERNELS=0``, so eager and fused layouts share
a launch. ``@dpo`` and ``@distill`` run those alignment stages instead (4-process layouts of theirs).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model import kernels  # noqa: E402
from tests.distributed.parity_config import EAGER, parity_config  # noqa: E402
from train.loop import train  # noqa: E402

DPO = "@dpo"
"""Token among a layout's overrides: run ``rlhf.dpo`` on ``rlhf_parity_config`` (data in ``OUT/rlhf_data``, made
by the test) instead of the pretraining loop: DPO under TP x PP with sequence parallelism needs 4 processes."""


def run_dpo_layout(out: Path, name: str, overrides: list[str]) -> None:
    from tests.distributed.rlhf_parity_config import rlhf_parity_config, run_stage_config

    cfg = rlhf_parity_config("dpo", out / "rlhf_data", [*overrides, f"--run.dir={out / name}"])
    result = run_stage_config("dpo", cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / name / "kernels.json").write_text(json.dumps({"sequence_parallel": result.sequence_parallel}))
    if result.reason != "completed":
        raise SystemExit(f"layout {name}: {result.reason}")


DISTILL = "@distill"
"""Token among a layout's overrides: run ``rlhf.distill`` on ``tests/e2e/test_distill_tiny.py``'s settings (the
teacher checkpoint in ``OUT/teacher``, made by the test): the student at TP x PP with sequence parallelism needs
4 processes."""


def run_distill_layout(out: Path, name: str, overrides: list[str]) -> None:
    from rlhf.distill.config import DistillConfig
    from rlhf.distill.train import DistillTask, run_distill
    from rlhf.stage import world_size
    from tests.e2e.test_distill_tiny import distill_args

    task = DistillTask(DistillConfig.from_toml(None, distill_args(out, name, *overrides)))
    task.resolve(world_size=world_size())
    result, _ = run_distill(task.cfg, task=task, print_fn=lambda *a, **k: None)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / name / "kernels.json").write_text(json.dumps({"sequence_parallel": result.sequence_parallel}))
    if result.reason != "completed":
        raise SystemExit(f"layout {name}: {result.reason}")


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, _, joined = spec.partition("=")
        overrides = [o for o in joined.split(",") if o]
        if DPO in overrides:
            run_dpo_layout(out, name, [o for o in overrides if o != DPO])
            continue
        if DISTILL in overrides:
            run_distill_layout(out, name, [o for o in overrides if o != DISTILL])
            continue
        cfg = parity_config([*(o for o in overrides if o != EAGER), f"--run.dir={out / name}"])
        with kernels.disabled() if EAGER in overrides else contextlib.nullcontext():
            result = train(cfg, print_fn=lambda *a, **k: None)
            if int(os.environ.get("RANK", "0")) == 0:  # what this layout ran on, for the test to check
                (out / name / "kernels.json").write_text(json.dumps({"fused_cpu_kernels": kernels.enabled(),
                                                                     "sequence_parallel": result.sequence_parallel}))
        # Every rank's place in the grid as megatron-core and DeepSpeed's pipe see it (the rank-order test).
        from train.topology import Topology

        topo = Topology.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp)
        rank = int(os.environ.get("RANK", "0"))
        (out / name / f"coordinates_rank{rank}.json").write_text(json.dumps(
            {"tp": topo.tp_rank, "cp": topo.cp_rank, "pp": topo.pp_rank, "dp": topo.dp_rank,
             "dp_cp": topo.dp_cp_rank, "sizes": [topo.tp_size, topo.cp_size, topo.pp_size, topo.dp_size]}))
        if result.reason != "completed":
            raise SystemExit(f"layout {name}: {result.reason}")


if __name__ == "__main__":
    main()
