"""Worker for the distributed parity tests: run several layouts of the real training loop in one launch.

    torchrun --standalone --nproc-per-node 2 tests/distributed/run_layouts.py OUT_DIR NAME=OVERRIDES ...

Each ``NAME=--a.b=1,--c.d=2`` runs ``train.loop.train`` (DeepSpeed engine, megatron-core layers) on the
parity config with those overrides, into ``OUT_DIR/NAME``. One launch serves many layouts because each
launch costs seconds; the process groups are rebuilt between layouts whose TP/PP sizes differ.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.distributed.parity_config import parity_config  # noqa: E402
from train.loop import train  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, _, overrides = spec.partition("=")
        cfg = parity_config([*(o for o in overrides.split(",") if o), f"--run.dir={out / name}"])
        result = train(cfg, print_fn=lambda *a, **k: None)
        if result.reason != "completed":
            raise SystemExit(f"layout {name}: {result.reason}")


if __name__ == "__main__":
    main()
