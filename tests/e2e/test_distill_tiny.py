"""``python -m rlhf.distill`` end to end on CPU: online teacher, offline teacher logits, a TP2 teacher beside a
TP1 x DP2 student, a TP2 student and a DP2 x ZeRO-3 student beside a TP1 teacher, a PP2 student beside a TP2
teacher (one torchrun launch), all giving the same per-step losses.

    python -m pytest -q tests/e2e/test_distill_tiny.py

Teacher: a seeded debug_tiny saved as a native checkpoint; student: debug_tiny with one layer, synthetic documents,
top-16 forward KL mixed with 30% hard labels. Online and offline (fp32 store) runs must agree exactly (the same
numbers reach the loss); the 2-process runs (the real DeepSpeed engine: a TP2 teacher beside a TP1 x DP2 student,
a TP2 student and a DP2 x ZeRO-3 student beside a TP1 teacher, a PP2 student beside a TP2 teacher) must match the
one-process run within 1e-5 (per-step losses and gradient norms, the exported weights after the last step). SFT dialogues
(``distill.data = sft``): with the hard labels alone the losses are exactly ``rlhf.sft``'s (answer-only mask).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(600)
TOL = 1e-5


def distill_args(out: Path, name: str, *extra: str) -> list[str]:
    return ["--model.name=debug_tiny", "--model.overrides.n_layers=1", "--data.synthetic=true", "--data.seq_len=32",
            f"--distill.teacher={out / 'teacher'}", "--distill.top_k=16", "--distill.hard_label_weight=0.3",
            "--distill.temperature=2.0", "--train.steps=3", "--train.global_batch_size=4",
            "--train.micro_batch_size=2", "--train.eval_every=3", "--train.eval_batches=1", "--checkpoint.every=0",
            "--logging.wandb=false", "--optim.lr=1e-2", "--optim.warmup_steps=1", f"--run.dir={out / name}", *extra]


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r.get("type") == "train"}


def run_one_process(out: Path, name: str, *extra: str) -> dict:
    from rlhf.distill.config import DistillConfig
    from rlhf.distill.train import run_distill
    from train.reference import ReferenceEngine, single_process_topology

    cfg = DistillConfig.from_toml(None, distill_args(out, name, *extra))
    _, evaluation = run_distill(cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology,
                                print_fn=lambda *a, **k: None)
    return evaluation or {}


def make_teacher(out: Path) -> Path:
    """The seeded debug_tiny teacher ``distill_args`` reads, saved as a native checkpoint in ``out / "teacher"``
    (``tests/distributed/test_parity.py``'s TP2 x PP2 student uses it too)."""
    from model.checkpoints import save_checkpoint
    from model.config import get_config
    from model.llama import Llama, init_llama_weights

    cfg = get_config("debug_tiny")
    teacher = Llama(cfg)
    init_llama_weights(teacher, seed=9)
    save_checkpoint(teacher.state_dict(), cfg, out / "teacher", format="native")
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("distill"))


def test_offline_logits_give_the_online_losses(out: Path) -> None:
    from rlhf.distill.config import DistillConfig
    from rlhf.distill.train import DistillTask, run_distill

    evaluation = run_one_process(out, "online")
    assert set(evaluation) >= {"kl", "student_loss", "teacher_loss", "argmax_agreement"}
    cfg = DistillConfig.from_toml(None, distill_args(out, "pre", f"--distill.precompute_to={out / 'logits'}"))
    task = DistillTask(cfg)
    task.resolve(world_size=1)
    result, _ = run_distill(task.cfg, task=task)
    assert result.samples == 12 + 2 and (out / "logits" / "valid" / "index.json").is_file()
    run_one_process(out, "offline", f"--distill.teacher_logits={out / 'logits'}", "--distill.teacher=")
    assert losses(out / "offline") == losses(out / "online")
    assert len(losses(out / "online")) == 3


# Two-process layouts, one torchrun launch (tests/e2e/run_distill_layouts.py): the teacher split over both ranks
# beside a TP1 x DP2 student, a TP2 student (vocabulary-parallel KL and CE) beside a whole teacher on each rank,
# a DP2 x ZeRO-3 student (its parameters partitioned) beside a whole teacher on each rank, and a PP2 student (the
# teacher's top-k reach the last stage's loss with the labels) beside the teacher split over both ranks (the two
# layouts independent: both pipeline stages run the TP2 teacher on the same micro-batch). The TP2 student runs
# Megatron sequence parallelism (the default at tp > 1); a TP2 x PP2 student with it runs in test_parity.py's
# 4-process launch (test_distill_student_under_tp_pp_with_sequence_parallelism, these settings).
LAYOUTS = {"teacher_tp2": "--distill.teacher_tp=2", "student_tp2": "--parallel.tp=2",
           "student_dp2_zero3": "--zero.stage=3", "student_pp2": "--parallel.pp=2,--distill.teacher_tp=2"}


@pytest.fixture(scope="module")
def two_process_runs(out: Path) -> Path:
    specs = [f"{name}={overrides}" for name, overrides in LAYOUTS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO_ROOT / "tests" / "e2e" / "run_distill_layouts.py"), str(out), *specs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_process_layout_matches_one_process(two_process_runs: Path, layout: str) -> None:
    """``teacher_tp2``: TP2 teacher with a TP1 x DP2 student; ``student_tp2`` / ``student_dp2_zero3``: a TP2 /
    DP2 x ZeRO-3 student with a TP1 teacher; ``student_pp2``: a PP2 student with a TP2 teacher. Per-step losses,
    gradient norms and the exported weights after the 3 steps equal the one-process online run within 1e-5."""
    out = two_process_runs
    if not (out / "online" / "metrics.jsonl").is_file():
        run_one_process(out, "online")
    ours, ref = losses(out / layout), losses(out / "online")
    assert sorted(ours) == sorted(ref) == [1, 2, 3]
    for step in ref:
        assert abs(ours[step] - ref[step]) <= TOL, (layout, step, ours[step], ref[step])
    assert ref[1] != ref[3]  # the student trained
    g, g_ref = losses(out / layout, "grad_norm"), losses(out / "online", "grad_norm")
    assert all(abs(g[s] - g_ref[s]) <= TOL * max(1.0, g_ref[s]) for s in g_ref), (layout, g, g_ref)
    from safetensors.torch import load_file

    weights = [load_file(out / run / "final_model" / "model.safetensors") for run in (layout, "online")]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[1]) <= TOL, layout
    assert (out / layout / "distill_eval.json").is_file()
    assert json.loads((out / layout / "sequence_parallel.json").read_text()) == (layout == "student_tp2"), layout


@pytest.mark.slow
def test_sft_dialogues_answer_only(out: Path, tmp_path: Path) -> None:
    """``distill.data = sft``: dialogues packed like ``rlhf.sft`` (loss on the answers only). With
    ``hard_label_weight = 1`` the per-step losses are exactly ``rlhf.sft``'s on the same data and seed (same packing,
    same mask); with a distillation term the batches carry prompt tokens outside the mask and the run trains."""
    from rlhf.distill.config import DistillConfig
    from rlhf.distill.train import DistillTask, run_distill
    from tests.distributed.rlhf_parity_config import make_parity_data, rlhf_parity_config, run_stage_config
    from train.reference import ReferenceEngine, single_process_topology

    data = make_parity_data(tmp_path / "data")
    one = dict(engine_factory=ReferenceEngine, topology_factory=single_process_topology)
    run_stage_config("sft", rlhf_parity_config("sft", data, [f"--run.dir={tmp_path / 'sft'}"]), **one)
    sft_toml = rlhf_parity_config("sft", data, []).to_toml()  # the SFT settings the distill runs below repeat
    assert "max_records_per_file = 200" in sft_toml and "grad_clip = 0.5" in sft_toml

    def distill(name: str, *extra: str) -> DistillTask:
        from tests.distributed.rlhf_parity_config import COMMON

        cfg = DistillConfig.from_toml(None, [
            *COMMON, "--optim.grad_clip=0.5", "--distill.data=sft", f"--distill.files={data / 'prefs.jsonl'}",
            "--distill.max_records_per_file=200", f"--distill.init_checkpoint={data / 'init'}",
            f"--data.tokenizer={data / 'tok.model'}", f"--distill.teacher={out / 'teacher'}",
            f"--run.dir={tmp_path / name}", *extra])
        task = DistillTask(cfg)
        task.resolve(world_size=1)
        run_distill(task.cfg, task=task, print_fn=lambda *a, **k: None, **one)
        return task

    distill("hard", "--distill.hard_label_weight=1.0")
    ours, ref = losses(tmp_path / "hard"), losses(tmp_path / "sft")
    assert sorted(ours) == sorted(ref) == [1, 2, 3]
    assert all(abs(ours[s] - ref[s]) <= 1e-6 for s in ref), (ours, ref)
    task = distill("kd", "--distill.hard_label_weight=0.3", "--distill.top_k=16")
    sample = task.train_set[0]
    mask = sample["loss_mask"]
    assert 0 < float(mask.sum()) < mask.numel()  # prompts (and padding) are outside the loss
    kd = losses(tmp_path / "kd")
    assert sorted(kd) == [1, 2, 3] and kd != ours
    evaluation = json.loads((tmp_path / "kd" / "distill_eval.json").read_text())
    assert 0 < evaluation["tokens"] and evaluation["kl"] > 0
