"""Distributed parity on CPU/gloo: every TP x PP x ZeRO layout equals the plain PyTorch loop.

Two ``torchrun`` launches serve all layouts (each launch costs seconds; ``run_layouts.py`` runs the real
training loop for several layouts in one launch):

- 4 processes: TP2 x PP2 (checkpoints at steps 3 and 5), TP2 x DP2 with ZeRO-3, PP2 x DP2 (ranks in Llama 3's
  [TP, CP, PP, DP] order: every rank's coordinates are checked), and DPO (``rlhf.dpo``) at TP2 x PP2 with
  sequence parallelism against its one-process reference (3 steps), and the distillation student (``rlhf.distill``)
  at TP2 x PP2 with sequence parallelism against its one-process reference (3 steps);
  every TP 2 layout runs Megatron sequence parallelism (the default at TP > 1), ``tp2_sp_off`` plain TP;
- 2 processes: TP2, PP2, DP2 with ZeRO-1/2/3, ZeRO-2 with CPU offload, PP2 with activation checkpointing,
  TP2 with one kv head (replicated kv projections), and resumes from the step-3 checkpoints of the first launch
  at another layout (the portable re-sharding path): TP1 x DP2 and DP2 x ZeRO-3 from TP2 x PP2, PP2 from
  TP2 x DP2 x ZeRO-3.

Every layout above runs the fused CPU kernels (fp32 on CPU). The eager PyTorch formulas, which are the GPU path,
get the same check at TP2, PP2 and DP2 x ZeRO-3 (``EAGER``: ``kernels.disabled()``, the in-process form of
``LLAMA_CPU_KERNELS=0``, inside the same launches), against a reference that is eager too.

The reference is ``train.reference.ReferenceEngine`` through the same loop in this process. Acceptance
(issue "3D parallelism"): per-step losses and final consolidated weights within 1e-5, fp32, 5 steps.
Measured here: differences of at most ~5e-7.

Measured: eager layouts vs the eager reference at most 4.8e-7 (losses) and 1.3e-7 (weights).

bf16 (fp32 master weights, as the large presets train) is checked against the fp32 reference with stated
tolerances, not exactness: DP2 x ZeRO-2 and, the PPO 70B setting, TP2 x DP2 x ZeRO-3 with activation
checkpointing: per-step loss within 1e-3 and final weights within 1e-2 of fp32 (bf16 keeps 8 mantissa bits;
measured 1.3e-4 and 3.5e-3 for both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from model import kernels
from tests.conftest import REPO_ROOT
from tests.distributed.parity_config import EAGER, parity_config
from train.loop import train
from train.reference import ReferenceEngine, single_process_topology

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TOL = 1e-5

FOUR_PROCESS = {
    "tp2_pp2": ["--parallel.tp=2", "--parallel.pp=2", "--checkpoint.every=3"],
    "tp2_dp2_zero3": ["--parallel.tp=2", "--zero.stage=3", "--checkpoint.every=3"],
    # PP inside DP ([TP, CP, PP, DP]): stage neighbours adjacent, DP replicas outermost.
    "pp2_dp2": ["--parallel.pp=2"],
    # Validation passes between SP training steps: whole sequences through the pipe, then slices again.
    "tp2_pp2_validation": ["--parallel.tp=2", "--parallel.pp=2", "--train.eval_every=2"],
}
EAGER_LAYOUTS = {
    "tp2_eager": [EAGER, "--parallel.tp=2"],
    "pp2_eager": [EAGER, "--parallel.pp=2"],
    "dp2_zero3_eager": [EAGER, "--zero.stage=3"],
}
TWO_PROCESS = {
    "tp2": ["--parallel.tp=2"],
    "pp2": ["--parallel.pp=2"],
    "dp2_zero1": ["--zero.stage=1"],
    "dp2_zero2": ["--zero.stage=2"],
    "dp2_zero3": ["--zero.stage=3"],
    "dp2_zero2_offload": ["--zero.stage=2", "--zero.offload=true"],
    "pp2_activation_checkpointing": ["--parallel.pp=2", "--parallel.activation_checkpoint_every=1"],
    "pp2_causal_no_document_mask": ["--parallel.pp=2", "--data.document_mask=false"],
    "tp2_one_kv_head": ["--parallel.tp=2", "--model.overrides.n_kv_heads=1"],
    # Sequence parallelism is on by default at TP > 1 (every TP layout above runs it); plain TP stays tested.
    "tp2_sp_off": ["--parallel.tp=2", "--parallel.sequence_parallel=false"],
}
# DPO (rlhf.dpo, varying-length pairs) at TP2 x PP2 with sequence parallelism, in the 4-process launch: the DPO loss
# on the last stage reads the logits of the gathered sequence, each stage passes s / tp slices.
DPO_FOUR_PROCESS = {"dpo_tp2_pp2": ["@dpo", "--parallel.tp=2", "--parallel.pp=2"]}
# The distillation student (rlhf.distill, tests/e2e/test_distill_tiny.py's settings: a whole teacher on every rank)
# at TP2 x PP2 with sequence parallelism: the teacher's [b, s, k] top-k reach the last stage's loss as targets.
DISTILL_FOUR_PROCESS = {"distill_tp2_pp2": ["@distill", "--parallel.tp=2", "--parallel.pp=2"]}
BF16 = {"dp2_zero2_bf16": ["--zero.stage=2", "--train.dtype=bf16"]}
BF16_FOUR_PROCESS = {"tp2_dp2_zero3_bf16": ["--parallel.tp=2", "--zero.stage=3", "--train.dtype=bf16",
                                            "--parallel.activation_checkpoint_every=1"]}
BF16_LOSS_TOL, BF16_WEIGHT_TOL = 1e-3, 1e-2
REFERENCE_OF = {"tp2_one_kv_head": "reference_kv1", "pp2_causal_no_document_mask": "reference_causal",
                "tp2_pp2_validation": "reference_validation",
                **{name: "reference_eager" for name in EAGER_LAYOUTS}}
# Resumes at another layout from the step-3 checkpoints of the 4-process launch: (new layout flags, source run).
RESUMES = {
    "resume_tp1_dp2_from_tp2_pp2": ([], "tp2_pp2"),
    "resume_dp2_zero3_from_tp2_pp2": (["--zero.stage=3"], "tp2_pp2"),
    "resume_pp2_from_tp2_dp2_zero3": (["--parallel.pp=2"], "tp2_dp2_zero3"),
}


def _launch(out: Path, nproc: int, layouts: dict[str, list[str]]) -> None:
    specs = [f"{name}={','.join(args)}" for name, args in layouts.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO_ROOT / "tests" / "distributed" / "run_layouts.py"), str(out), *specs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun ({nproc} processes) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parity")
    quiet = {"print_fn": lambda *a, **k: None}
    train(parity_config([f"--run.dir={out / 'reference'}"]), engine_factory=ReferenceEngine,
          topology_factory=single_process_topology, **quiet)
    train(parity_config([f"--run.dir={out / 'reference_kv1'}", "--model.overrides.n_kv_heads=1"]),
          engine_factory=ReferenceEngine, topology_factory=single_process_topology, **quiet)
    train(parity_config([f"--run.dir={out / 'reference_causal'}", "--data.document_mask=false"]),
          engine_factory=ReferenceEngine, topology_factory=single_process_topology, **quiet)
    train(parity_config([f"--run.dir={out / 'reference_validation'}", "--train.eval_every=2"]),
          engine_factory=ReferenceEngine, topology_factory=single_process_topology, **quiet)
    with kernels.disabled():
        train(parity_config([f"--run.dir={out / 'reference_eager'}"]), engine_factory=ReferenceEngine,
              topology_factory=single_process_topology, **quiet)
    from tests.distributed.rlhf_parity_config import make_parity_data, rlhf_parity_config, run_stage_config

    data = make_parity_data(out / "rlhf_data")
    run_stage_config("dpo", rlhf_parity_config("dpo", data, [f"--run.dir={out / 'reference_dpo'}"]),
                     engine_factory=ReferenceEngine, topology_factory=single_process_topology)
    from tests.e2e.test_distill_tiny import make_teacher, run_one_process

    run_one_process(make_teacher(out), "reference_distill")
    _launch(out, 4, {**FOUR_PROCESS, **BF16_FOUR_PROCESS, **DPO_FOUR_PROCESS, **DISTILL_FOUR_PROCESS})
    resumes = {name: [*flags, f"--run.resume={out / source / 'checkpoints' / 'step_00000003'}"]
               for name, (flags, source) in RESUMES.items()}
    _launch(out, 2, {**TWO_PROCESS, **EAGER_LAYOUTS, **BF16, **resumes})
    return out


def _metrics(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r.get("type") == "train"}


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "final_model" / "model.safetensors"), load_file(b / "final_model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_validation_between_sequence_parallel_pipeline_steps(runs: Path) -> None:
    """TP 2 x PP 2 with SP and a validation pass every 2 steps: the validation losses equal one process's and
    training goes on equal after them (the loss comparison is ``test_layout_matches_single_process``)."""
    def validation(run: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["val_loss"] for r in records if r.get("type") == "validation"}

    ours, ref = validation(runs / "tp2_pp2_validation"), validation(runs / "reference_validation")
    assert ours and sorted(ours) == sorted(ref)
    for step, loss in ours.items():
        assert abs(loss - ref[step]) <= TOL, (step, loss, ref[step])


def test_ranks_sit_in_llama3_grid_order(runs: Path) -> None:
    """Every rank's coordinates, as megatron-core's groups give them after a real run, are those of the
    [TP, CP, PP, DP] grid (``train.topology.grid_coordinates``), for the 4-process layouts (TP x PP, TP x DP,
    PP x DP) and the 2-process ones."""
    from train.topology import grid_coordinates

    for name in [*FOUR_PROCESS, "tp2", "pp2", "dp2_zero1"]:
        files = sorted((runs / name).glob("coordinates_rank*.json"))
        assert len(files) == (4 if name in FOUR_PROCESS else 2), name
        for path in files:
            rank = int(path.stem.removeprefix("coordinates_rank"))
            got = json.loads(path.read_text())
            tp, cp, pp, dp = got["sizes"]
            want = grid_coordinates(rank, tp=tp, cp=cp, pp=pp, dp=dp)
            assert {k: got[k] for k in want} == want, (name, rank, got)
            assert got["dp_cp"] == want["dp"] * cp + want["cp"]


def test_sequence_parallel_is_the_default_at_tp_above_one(runs: Path) -> None:
    """What each layout ran (``RunResult.sequence_parallel``): on at every TP 2 layout, with PP and ZeRO-3 too;
    off when asked, at TP 1, and with replicated K/V projections (one kv head: the engine falls back)."""
    ran = {name: json.loads((runs / name / "kernels.json").read_text())["sequence_parallel"]
           for name in [*FOUR_PROCESS, *TWO_PROCESS, *EAGER_LAYOUTS]}
    on = {"tp2_pp2", "tp2_dp2_zero3", "tp2_pp2_validation", "tp2", "tp2_eager"}
    assert {name for name, sp in ran.items() if sp} == on, ran


@pytest.mark.parametrize("layout", [*FOUR_PROCESS, *TWO_PROCESS, *EAGER_LAYOUTS])
def test_layout_matches_single_process(runs: Path, layout: str) -> None:
    ref_dir = runs / REFERENCE_OF.get(layout, "reference")
    ours, ref = _metrics(runs / layout), _metrics(ref_dir)
    assert sorted(ours) == [1, 2, 3, 4, 5]
    for step, record in ours.items():
        assert abs(record["loss"] - ref[step]["loss"]) <= TOL, (layout, step, record["loss"], ref[step]["loss"])
        assert abs(record["grad_norm"] - ref[step]["grad_norm"]) <= TOL, (layout, step)
    # Clipping (0.3) is active at every step, so the TP/PP-aware norm is part of what is checked.
    assert min(r["grad_norm"] for r in ref.values()) > 0.3
    assert _max_weight_diff(runs / layout, ref_dir) <= TOL


def test_eager_layouts_ran_the_eager_formulas(runs: Path) -> None:
    """The eager and the fused runs of a layout differ by float rounding only, and they do differ: the eager
    layouts did not silently run the fused kernels."""
    for eager, fused in (("tp2_eager", "tp2"), ("pp2_eager", "pp2"), ("dp2_zero3_eager", "dp2_zero3")):
        assert json.loads((runs / eager / "kernels.json").read_text())["fused_cpu_kernels"] is False
        if not json.loads((runs / fused / "kernels.json").read_text())["fused_cpu_kernels"]:
            continue  # no C compiler here: both ran eager (tests/unit/test_kernels.py says so, or fails in CI)
        a, b = _metrics(runs / eager), _metrics(runs / fused)
        gaps = [abs(a[s]["loss"] - b[s]["loss"]) for s in a] + [_max_weight_diff(runs / eager, runs / fused)]
        assert 0 < max(gaps) <= TOL, (eager, gaps)


def test_dpo_under_tp_pp_with_sequence_parallelism(runs: Path) -> None:
    """DPO at TP 2 x PP 2 ran sequence parallelism and equals one process within 1e-5: per-step losses, gradient
    norms (clipped), the reference log-probs its sharded engine scored (DeepSpeed's inference schedule: whole
    sequences), the exported weights."""
    assert json.loads((runs / "dpo_tp2_pp2" / "kernels.json").read_text())["sequence_parallel"] is True
    ours, ref = (_metrics(runs / r) for r in ("dpo_tp2_pp2", "reference_dpo"))
    assert sorted(ours) == sorted(ref) == [1, 2, 3]
    for step, record in ours.items():
        assert abs(record["loss"] - ref[step]["loss"]) <= TOL, (step, record["loss"], ref[step]["loss"])
        assert abs(record["grad_norm"] - ref[step]["grad_norm"]) <= TOL * max(1.0, ref[step]["grad_norm"]), step
    a, b = (load_file(runs / r / "reference_logps.safetensors")["ref_logps"] for r in ("dpo_tp2_pp2", "reference_dpo"))
    assert float(((a - b).abs() / b.abs().clamp(min=1.0)).max()) <= TOL
    assert _max_weight_diff(runs / "dpo_tp2_pp2", runs / "reference_dpo") <= TOL


def test_distill_student_under_tp_pp_with_sequence_parallelism(runs: Path) -> None:
    """The distillation student at TP 2 x PP 2 ran sequence parallelism and equals one process within 1e-5:
    per-step losses (KL over the teacher's top-16 + 30% hard labels), gradient norms, the exported weights."""
    assert json.loads((runs / "distill_tp2_pp2" / "kernels.json").read_text())["sequence_parallel"] is True
    ours, ref = (_metrics(runs / r) for r in ("distill_tp2_pp2", "reference_distill"))
    assert sorted(ours) == sorted(ref) == [1, 2, 3]
    assert ref[1]["loss"] != ref[3]["loss"]  # the student trained
    for step, record in ours.items():
        assert abs(record["loss"] - ref[step]["loss"]) <= TOL, (step, record["loss"], ref[step]["loss"])
        assert abs(record["grad_norm"] - ref[step]["grad_norm"]) <= TOL * max(1.0, ref[step]["grad_norm"]), step
    assert _max_weight_diff(runs / "distill_tp2_pp2", runs / "reference_distill") <= TOL


@pytest.mark.parametrize("layout", [*BF16, *BF16_FOUR_PROCESS])
def test_bf16_mixed_precision_tracks_fp32(runs: Path, layout: str) -> None:
    """bf16 compute with fp32 master weights: close to the fp32 run (BF16_LOSS_TOL, BF16_WEIGHT_TOL), master
    weights in fp32. The TP2 x ZeRO-3 case is the PPO 70B preset's setting (with activation checkpointing)."""
    ours, ref = _metrics(runs / layout), _metrics(runs / "reference")
    assert sorted(ours) == [1, 2, 3, 4, 5]
    assert max(abs(ours[s]["loss"] - ref[s]["loss"]) for s in ours) < BF16_LOSS_TOL
    assert _max_weight_diff(runs / layout, runs / "reference") < BF16_WEIGHT_TOL
    weights = load_file(runs / layout / "final_model" / "model.safetensors")
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}


@pytest.mark.parametrize("resume", RESUMES)
def test_resume_at_another_layout_continues_the_run(runs: Path, resume: str) -> None:
    """TP x PP -> DP (ZeRO-1 and ZeRO-3, Adam moments re-partitioned) and TP x DP ZeRO-3 -> PP: the resumed
    steps equal the uninterrupted reference (weights, master weights and moments all came back)."""
    resumed, ref = _metrics(runs / resume), _metrics(runs / "reference")
    assert sorted(resumed) == [4, 5], "the resumed run starts after the step-3 checkpoint"
    for step in (4, 5):
        assert abs(resumed[step]["loss"] - ref[step]["loss"]) <= TOL, (step, resumed[step], ref[step])
    assert _max_weight_diff(runs / resume, runs / "reference") <= TOL


def test_consolidate_cli_native_and_hf(runs: Path, tmp_path: Path) -> None:
    from model.checkpoints import load_checkpoint

    run = runs / "tp2_pp2"
    for fmt in ("native", "hf"):
        proc = subprocess.run([sys.executable, "-m", "train.consolidate", "--checkpoint", str(run),
                               "--output", str(tmp_path / fmt), "--format", fmt], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["checkpoint"].endswith("step_00000005")
    _, final = load_checkpoint(run / "final_model")
    for fmt in ("native", "hf"):
        _, weights = load_checkpoint(tmp_path / fmt)
        assert weights.keys() == final.keys()
        assert all(bool((weights[k] == final[k]).all()) for k in final), fmt


def test_consolidate_refuses_a_directory_without_checkpoints(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "train.consolidate", "--checkpoint", str(tmp_path),
                           "--output", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "neither a complete checkpoint" in proc.stderr
