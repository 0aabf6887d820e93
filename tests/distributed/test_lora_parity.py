"""LoRA SFT (and DPO / reward model) under TP2, DP2 x ZeRO-2 and DP2 x ZeRO-3 equals one plain PyTorch process
(CPU/gloo, fp32).

    python -m pytest -q tests/distributed/test_lora_parity.py

``[lora] rank=4, alpha=8`` on every projection (q, k, v, o, gate, up, down: column- and row-parallel layers
alike), the real ``rlhf.sft`` loop with the DeepSpeed engine and megatron-core layers (``run_rlhf_layouts.py``)
against ``train.reference.ReferenceEngine`` in this process (at ZeRO-3 the frozen base is built partitioned like
the adapters, and the export streams it from every rank's partitions). Acceptance (issue 19): per-step losses,
gradient norms (clipped every step) and the exported merged weights and adapters within 1e-5; the first step's loss
equals full fine-tuning's (B = 0); the engine's checkpoint holds only the adapters, and a ZeRO-3 run resumed from
it gives the same step 3. ``lora_tp2`` runs Megatron sequence parallelism (the default at tp > 1: adapters split
along the sequence with their layers). The same launch runs LoRA DPO under TP2 with sequence parallelism off
and a LoRA reward model under DP2 x ZeRO-2 against their one-process references (losses, grad norms, every exported
tensor within 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.distributed.rlhf_parity_config import make_parity_data, rlhf_parity_config, run_stage_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TOL = 1e-5
LORA = "--lora.rank=4,--lora.alpha=8,--lora.targets=q,k,v,o,gate,up,down,--checkpoint.every=3"
# lora_dp2_zero3 also checkpoints at step 2, from which lora_dp2_zero3_resumed (same launch) runs step 3 alone.
LAYOUTS = {"lora_tp2": "--parallel.tp=2", "lora_dp2_zero2": "--zero.stage=2",
           "lora_dp2_zero3": "--zero.stage=3,--checkpoint.every=2"}
RESUMED = "lora_dp2_zero3_resumed"
# The other [lora] stages through the same engine seam: DPO (policy adapted, frozen reference scored by its own
# engine) under TP2 and the reward model (adapters + its trainable head) under DP2 x ZeRO-2.
# lora_tp2 runs sequence parallelism (on by default at tp > 1); lora_dpo_tp2 turns it off, so plain-TP adapters
# stay covered too.
STAGE_LAYOUTS = {"lora_dpo_tp2": ("dpo", "--parallel.tp=2,--parallel.sequence_parallel=false"),
                 "lora_rm_dp2_zero2": ("rm", "--zero.stage=2")}


def _split(overrides: str) -> list[str]:
    import re

    return [o for o in re.split(r",(?=--)", overrides) if o]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.reference import ReferenceEngine, single_process_topology

    out = tmp_path_factory.mktemp("lora_parity")
    data = make_parity_data(out / "data")
    references = [("sft", "reference_lora", _split(LORA)), ("sft", "reference_full", []),
                  *((stage, f"reference_lora_{stage}", _split(LORA)) for stage, _ in STAGE_LAYOUTS.values())]
    for stage, name, extra in references:
        cfg = rlhf_parity_config(stage, data, [*extra, f"--run.dir={out / name}"])
        run_stage_config(stage, cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology)
    specs = [f"{name}=sft:{LORA},{layout}" for name, layout in LAYOUTS.items()]  # the layout's flags win
    specs += [f"{name}={stage}:{layout},{LORA}" for name, (stage, layout) in STAGE_LAYOUTS.items()]
    step2 = out / "lora_dp2_zero3" / "checkpoints" / "step_00000002"
    specs += [f"{RESUMED}=sft:{LORA},--zero.stage=3,--run.resume={step2}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO_ROOT / "tests" / "distributed" / "run_rlhf_layouts.py"), str(out), str(data), *specs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def _metrics(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r.get("type", "train") == "train"}


def test_first_step_loss_equals_full_fine_tuning(runs: Path) -> None:
    lora, full = _metrics(runs / "reference_lora"), _metrics(runs / "reference_full")
    assert abs(lora[1]["loss"] - full[1]["loss"]) <= 1e-6
    assert abs(lora[3]["loss"] - full[3]["loss"]) > 1e-6  # then they train different parameters


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_layout_matches_single_process(runs: Path, layout: str) -> None:
    ours, ref = _metrics(runs / layout), _metrics(runs / "reference_lora")
    assert sorted(ours) == sorted(ref) == [1, 2, 3]
    for step, record in ours.items():
        assert abs(record["loss"] - ref[step]["loss"]) <= TOL, (layout, step, record["loss"], ref[step]["loss"])
        g, g_ref = record["grad_norm"], ref[step]["grad_norm"]
        assert abs(g - g_ref) <= TOL * max(1.0, g_ref), (layout, step, g, g_ref)
    for directory, weights in (("final_model", "model.safetensors"), ("final_model_lora", "adapter_model.safetensors")):
        ws, wr = load_file(runs / layout / directory / weights), load_file(runs / "reference_lora" / directory / weights)
        assert ws.keys() == wr.keys() and ws
        assert max(float((ws[k] - wr[k]).abs().max()) for k in wr) <= TOL, (layout, directory)
    # The training checkpoint holds the adapters only (and their Adam moments): the base is the init checkpoint's.
    from train.portable import PortableCheckpoint

    checkpoint = sorted((runs / layout / "checkpoints").glob("step_*"))[-1]
    saved = PortableCheckpoint(checkpoint).names()
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:5]
    stage = json.loads((checkpoint / "layout.json").read_text())["zero_stage"]
    assert stage == {"lora_dp2_zero2": 2, "lora_dp2_zero3": 3}.get(layout, 1), (layout, stage)  # what the engine ran


def test_lora_zero3_resume_matches_single_process(runs: Path) -> None:
    """A DP2 x ZeRO-3 LoRA run resumed from its step-2 checkpoint (adapters and their Adam moments from the
    partitions; the frozen base, never in a training checkpoint, from the init checkpoint again) gives the
    one-process step 3 and exports within 1e-5."""
    ours, ref = _metrics(runs / RESUMED), _metrics(runs / "reference_lora")
    assert sorted(ours) == [3]
    assert abs(ours[3]["loss"] - ref[3]["loss"]) <= TOL and abs(ours[3]["grad_norm"] - ref[3]["grad_norm"]) <= TOL
    for directory, weights in (("final_model", "model.safetensors"), ("final_model_lora", "adapter_model.safetensors")):
        ws, wr = load_file(runs / RESUMED / directory / weights), load_file(runs / "reference_lora" / directory / weights)
        assert ws.keys() == wr.keys() and ws
        assert max(float((ws[k] - wr[k]).abs().max()) for k in wr) <= TOL, directory


@pytest.mark.parametrize("layout", list(STAGE_LAYOUTS))
def test_lora_dpo_and_reward_model_match_single_process(runs: Path, layout: str) -> None:
    """LoRA DPO (TP2) and LoRA reward model (DP2 x ZeRO-2): losses, grad norms and every exported tensor (merged
    weights, the reward head, the PEFT adapters) equal one process within 1e-5; only adapters (and the head) train."""
    stage = STAGE_LAYOUTS[layout][0]
    ours, ref = _metrics(runs / layout), _metrics(runs / f"reference_lora_{stage}")
    assert sorted(ours) == sorted(ref) == [1, 2, 3]
    for step, record in ours.items():
        assert abs(record["loss"] - ref[step]["loss"]) <= TOL, (layout, step, record["loss"], ref[step]["loss"])
        g, g_ref = record["grad_norm"], ref[step]["grad_norm"]
        assert abs(g - g_ref) <= TOL * max(1.0, g_ref), (layout, step, g, g_ref)
    assert abs(ref[3]["loss"] - ref[1]["loss"]) > 1e-6  # the adapters trained
    files = sorted(p.relative_to(runs / layout) for p in (runs / layout).glob("final_model*/*.safetensors"))
    assert any(p.parent.name == "final_model_lora" for p in files), files
    for rel in files:
        ws, wr = load_file(runs / layout / rel), load_file(runs / f"reference_lora_{stage}" / rel)
        assert ws.keys() == wr.keys() and ws, rel
        assert max(float((ws[k] - wr[k]).abs().max()) for k in wr) <= TOL, (layout, rel)
    from train.portable import PortableCheckpoint

    (checkpoint,) = (runs / layout / "checkpoints").glob("step_*")
    saved = PortableCheckpoint(checkpoint).names()
    assert saved and all(".lora_A." in k or ".lora_B." in k or "reward_head" in k for k in saved), sorted(saved)[:5]
    if stage == "rm":
        assert any("reward_head" in k for k in saved)


def test_sequence_parallel_with_adapters(runs: Path) -> None:
    """LoRA SFT at TP 2 ran Megatron sequence parallelism (the adapters follow their layers' sequence split,
    ``model.lora``) and matched above; the DPO layout that turned it off ran plain TP."""
    ran = {name: json.loads((runs / name / "sequence_parallel.json").read_text())
           for name in ("lora_tp2", "lora_dpo_tp2")}
    assert ran == {"lora_tp2": True, "lora_dpo_tp2": False}
