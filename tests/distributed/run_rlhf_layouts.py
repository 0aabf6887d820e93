"""Worker for the alignment parity tests: SFT and reward-model layouts of the real loop in one launch.

    torchrun --standalone --nproc-per-node 2 tests/distributed/run_rlhf_layouts.py OUT DATA NAME=STAGE:OVERRIDES ...

Each ``NAME=sft:--parallel.tp=2`` runs ``rlhf.sft`` (or ``rm:...`` ``rlhf.reward``) with the DeepSpeed engine
and megatron-core layers on ``rlhf_parity_config`` plus the comma-separated overrides, into ``OUT/NAME``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.distributed.rlhf_parity_config import rlhf_parity_config, run_stage_config  # noqa: E402


def main() -> None:
    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    for spec in sys.argv[3:]:
        name, _, rest = spec.partition("=")
        stage, _, overrides = rest.partition(":")
        # Overrides are split at commas that start a new "--key" (a value may hold commas: --lora.targets=q,k).
        cfg = rlhf_parity_config(stage, data, [*(o for o in re.split(r",(?=--)", overrides) if o),
                                               f"--run.dir={out / name}"])
        result = run_stage_config(stage, cfg)
        if int(os.environ.get("RANK", "0")) == 0:  # what the engine ran, for the sequence-parallel test
            (out / name / "sequence_parallel.json").write_text(
                json.dumps(bool(getattr(result, "sequence_parallel", False))))
        if result.reason != "completed":
            raise SystemExit(f"layout {name}: {result.reason}")


if __name__ == "__main__":
    main()
