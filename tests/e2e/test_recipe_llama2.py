"""The whole Llama 2 chain through the one command, on real data: ``python -m rlhf.recipe llama2`` from a real
pretrained tiny Llama (stories260K, llama2.c's model in the shared data) on the HH-RLHF samples of
``$LLAMA_DATA_DIR``: SFT -> helpfulness RM -> safety RM -> evaluate_rm -> rejection sampling -> PPO -> GAtt data,
training and adherence, each stage kept to a few steps with ``--set STAGE:ARG``. Skips (fails under CI=true) when
the shared data is absent. ~85 s of CPU time (nine stage processes); 149 s wall at load average 6-9 (227 s at
~22) on the shared 2-core machine, hence the generous timeout.

Checks: every stage finished (``STAGE_DONE.json``), printed its key figure and has a ``summary.md``
(``train.report``'s for the training stages, evaluate_rm's table); the connected outputs exist (SFT's
self-describing export, PPO's final policy); ``recipe_summary.md`` has one row per stage; a second invocation runs
nothing and reports every stage as finished; MFU <= 100% on the training stages. The tiny reward models are weak
(a few steps), so PPO and rejection sampling are told ``--reward.allow_weak_rm=true`` / ``--allow-weak-rm``, and
GAtt's build ``--allow-degenerate``; how good the models get is not asserted here (``tests/e2e/test_rlhf_hh.py``,
``benchmarks/rlhf_hh_tiny.py``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require_file
from tests.run_checks import assert_honest_mfu

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STAGES = ["sft", "rm_helpful", "rm_safety", "eval_rm", "rs", "ppo", "gatt_data", "gatt", "gatt_eval"]
RECORDS = 48  # per HH-RLHF file: ~40 train / ~8 held-out pairs each


def _overrides() -> list[str]:
    small = ["--data.seq_len=128", "--train.eval_every=0", "--checkpoint.every=0"]
    sets = {
        "sft": [f"--sft.max_records_per_file={RECORDS}", *small, "--train.steps=2", "--train.global_batch_size=8"],
        # steps from the data: one epoch of ~80 (helpfulness) / ~45 (safety) pairs at 32 per step
        "rm_helpful": [f"--rm.max_records_per_file={RECORDS}", *small, "--train.steps=0"],
        "rm_safety": [f"--rm.max_records_per_file={RECORDS}", *small, "--train.steps=0"],
        "eval_rm": ["--max-pairs=16"],
        "rs": ["--max-prompts=3", "--k=2", "--max-new-tokens=8", "--allow-weak-rm"],
        "ppo": ["--ppo.iterations=2", "--ppo.prompts_per_iteration=8", "--train.global_batch_size=8",
                "--rollout.max_new_tokens=12", "--rollout.batch_size=8", "--prompts.heldout=8", "--eval.every=1",
                "--reward.allow_weak_rm=true"],  # a few-step RM is weak: the gate would (rightly) refuse it
        "gatt_data": ["--num=6", "--max-turns=2", "--max-new-tokens=12", "--allow-degenerate"],  # a 260K policy
        "gatt": ["--train.steps=2", "--train.eval_every=0"],
        "gatt_eval": ["--num=3", "--turns=2", "--max-new-tokens=8"],
    }
    return [a for stage, args in sets.items() for arg in args for a in ("--set", f"{stage}:{arg}")]


def _recipe(shared: Path, run_dir: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    ckpt = shared / "checkpoints" / "stories260K"
    cmd = [sys.executable, "-m", "rlhf.recipe", "llama2", "--pretrained", str(ckpt / "stories260K.bin"),
           "--tokenizer", str(ckpt / "tok512.model"), "--data", str(shared), "--run-dir", str(run_dir),
           *_overrides()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=560)
    return proc, time.perf_counter() - start


def test_the_llama2_chain_runs_through_one_command_and_skips_finished_stages(shared_data: Path,
                                                                              tmp_path: Path) -> None:
    for rel in ("checkpoints/stories260K/stories260K.bin", "checkpoints/stories260K/tok512.model",
                "preferences/hh-rlhf/helpful-base/test.jsonl.gz", "preferences/hh-rlhf/harmless-base/test.jsonl.gz"):
        require_file(shared_data / rel)
    run = tmp_path / "llama2_tiny"
    proc, seconds = _recipe(shared_data, run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"chain: {seconds:.1f} s")

    figures = dict(re.findall(r"^\[recipe\] (\w+) ran: (.*) \(\S+summary\.md\)$", proc.stdout, re.M))
    assert list(figures) == STAGES, proc.stdout[-3000:]
    assert re.fullmatch(r"held-out answer-token loss \d+\.\d{4} -> \d+\.\d{4}", figures["sft"])
    for rm in ("rm_helpful", "rm_safety"):
        assert re.fullmatch(r"helpful-base: accuracy [01]\.\d{3} \(length baseline [01]\.\d{3}\); "
                            r"harmless-base: accuracy [01]\.\d{3} \(length baseline [01]\.\d{3}\)", figures[rm])
    assert len(re.findall(r"rm_(helpful|safety) on (helpful|harmless)-base: [01]\.\d{3}", figures["eval_rm"])) == 4
    assert re.fullmatch(r"held-out LOGIT\(Rc\) -?\d+\.\d{3} -> best -?\d+\.\d{3} at iteration [012]", figures["ppo"])
    assert re.fullmatch(r"best-of-2 -?\d+\.\d{3} vs one sample -?\d+\.\d{3} \(gain [+-]\d+\.\d{3}\) over 6 prompts",
                        figures["rs"])

    modules = {"sft": "rlhf.sft", "rm_helpful": "rlhf.reward", "rm_safety": "rlhf.reward",
               "eval_rm": "rlhf.evaluate_rm", "rs": "rlhf.rejection_sampling", "ppo": "rlhf.ppo",
               "gatt_data": "rlhf.gatt", "gatt": "rlhf.gatt", "gatt_eval": "rlhf.gatt"}
    for stage in STAGES:
        done = json.loads((run / stage / "STAGE_DONE.json").read_text())
        assert done["stage"] == stage and done["command"][1:3] == ["-m", modules[stage]]
    # the numbers behind the figures, and each stage's summary.md with its own section
    sft_eval = json.loads((run / "sft" / "sft_eval.json").read_text())
    assert f"{sft_eval['heldout_loss_before']:.4f} -> {sft_eval['heldout_loss_after']:.4f}" in figures["sft"]
    assert "## SFT" in (run / "sft" / "report" / "summary.md").read_text()
    for rm in ("rm_helpful", "rm_safety"):
        assert "## Reward model (held-out pairs)" in (run / rm / "report" / "summary.md").read_text()
    evaluation = json.loads((run / "eval_rm" / "eval_rm.json").read_text())
    assert evaluation["pairs"] == {"helpful-base": 16, "harmless-base": 16}  # --max-pairs of the held-out side
    assert evaluation["checkpoints"] == {"rm_helpful": str(run / "rm_helpful"), "rm_safety": str(run / "rm_safety")}
    assert "length baseline (longer)" in (run / "eval_rm" / "summary.md").read_text()
    assert "## PPO" in (run / "ppo" / "report" / "summary.md").read_text()
    rs = json.loads((run / "rs" / "report.json").read_text())
    assert rs["prompts"] == 6 and len((run / "rs" / "best.jsonl").read_text().splitlines()) <= 6
    assert "mean best-of-k for k = 1..2" in (run / "rs" / "summary.md").read_text()
    assert figures["gatt_data"].startswith("6 GAtt dialogues") and len(
        (run / "gatt_data" / "gatt.jsonl").read_text().splitlines()) == 6
    assert re.fullmatch(r"last-turn loss \d+\.\d{4} -> \d+\.\d{4} \(2 steps logged\)", figures["gatt"])
    assert re.fullmatch(r"adherence at turns 2\+: before \d+%, after \d+%", figures["gatt_eval"])
    assert "## GAtt adherence" in (run / "gatt" / "report" / "summary.md").read_text()
    assert json.loads((run / "gatt" / "final_model" / "rlhf.json").read_text())["stage"] == "gatt"
    # MFU from the tokens computed, <= 100%, on every training stage of the chain (PPO logs no MFU)
    assert_honest_mfu(run / "gatt", max_tokens_per_step=16 * 256)
    assert_honest_mfu(run / "sft", max_tokens_per_step=8 * 128)
    for rm in ("rm_helpful", "rm_safety"):
        assert_honest_mfu(run / rm, max_tokens_per_step=2 * 32 * 128)  # chosen + rejected rows of 32 pairs
    assert json.loads((run / "sft" / "final_model" / "rlhf.json").read_text())["template"] == "llama2"
    assert (run / "ppo" / "final_policy" / "rlhf.json").is_file()
    table = (run / "recipe_summary.md").read_text()
    assert all(f"| {s} | ran | {figures[s]} | " in table for s in STAGES), table

    stamps = {s: (run / s / "STAGE_DONE.json").stat().st_mtime_ns for s in STAGES}
    again, seconds_again = _recipe(shared_data, run)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    print(f"second invocation: {seconds_again:.1f} s")
    assert re.findall(r"^\[recipe\] (\w+) skipped \(finished\): ", again.stdout, re.M) == STAGES
    assert "python -m" not in again.stdout and not re.search(r"^\[recipe\] \w+: ", again.stdout, re.M)
    assert stamps == {s: (run / s / "STAGE_DONE.json").stat().st_mtime_ns for s in STAGES}
    assert f"| ppo | skipped (finished) | {figures['ppo']} |" in (run / "recipe_summary.md").read_text()
