"""SFT, reward-model and DPO runs resume exactly from a checkpoint (the loop's, through the stage tasks' loaders):
a run continued from its step-3 checkpoint repeats the uninterrupted run's losses at steps 4-6 bit for bit.
Plain-PyTorch reference engine, in process (the DeepSpeed engine's own resume is tested in tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.rlhf_parity_config import make_parity_data, rlhf_parity_config, run_stage_config

pytestmark = pytest.mark.timeout(180)


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("type", r.get("kind", "train")) == "train"}


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_resume_from_a_checkpoint_repeats_the_run(stage: str, tmp_path: Path) -> None:
    from train.reference import ReferenceEngine, single_process_topology

    data = make_parity_data(tmp_path / "data")
    kw = {"engine_factory": ReferenceEngine, "topology_factory": single_process_topology}
    common = ["--train.steps=6", "--checkpoint.every=3", "--checkpoint.keep_last=3"]
    run_stage_config(stage, rlhf_parity_config(stage, data, [*common, f"--run.dir={tmp_path / 'full'}"]), **kw)
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000003"
    run_stage_config(stage, rlhf_parity_config(stage, data, [*common, f"--run.dir={tmp_path / 'resumed'}",
                                                             f"--run.resume={ckpt}"]), **kw)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    assert len(set(full.values())) == 6, "every step saw different data"
    if stage == "dpo":  # the resumed run scored its reference log-probs again (a fresh run dir): same table
        from safetensors.torch import load_file

        a, b = (load_file(tmp_path / r / "reference_logps.safetensors")["ref_logps"] for r in ("full", "resumed"))
        assert a.equal(b)
