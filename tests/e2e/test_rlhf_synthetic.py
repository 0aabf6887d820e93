"""End to end on synthetic preferences with a learnable property (``rlhf.synthetic``), no shared data needed.

- ``python -m rlhf.reward`` (DeepSpeed engine, one process) on graded pairs, then ``python -m rlhf.evaluate_rm``
  on the held-out pairs: >= 95% accuracy on every pair that carries the property, and mean score gaps that grow
  with the rating (significantly > better > slightly > negligibly better, the last being a coin flip);
- SFT on the chosen dialogues lowers the held-out answer-token loss; rejection sampling from the SFT model with
  the reward model: best-of-8 beats a single sample on held-out prompts, and a second round keeps the best of
  both rounds;
- bad input: the CLIs exit 2 with one line naming the field / file and the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.synthetic import synthetic_tokenizer, write_synthetic_preferences
from tests.conftest import REPO_ROOT
from tests.run_checks import assert_honest_mfu

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
RATING_ORDER = ("significantly_better", "better", "slightly_better", "negligibly_better")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    synthetic_tokenizer(root / "tok")
    write_synthetic_preferences(root / "prefs.jsonl", n=2000, seed=0, graded=True)
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def reward_run(data: Path) -> Path:
    run = data / "rm"
    cmd = [sys.executable, "-m", "rlhf.reward", "--model.name=debug_tiny", f"--data.tokenizer={data / 'tok.model'}",
           "--data.seq_len=96", f"--rm.helpful_files={data / 'prefs.jsonl'}", "--rm.mixture=all",
           "--rm.margin=large", "--train.global_batch_size=32", "--train.micro_batch_size=16",
           "--train.eval_every=0", "--optim.lr=3e-3", "--checkpoint.every=0", "--logging.wandb=false",
           f"--run.dir={run}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "[rm] held out prefs: accuracy" in proc.stdout
    assert_honest_mfu(run, max_tokens_per_step=2 * 32 * 96)  # two rows (chosen, rejected) per pair
    return run


def test_reward_model_learns_the_property_and_grades_its_gaps(reward_run: Path, data: Path) -> None:
    out = data / "eval"
    proc = subprocess.run([sys.executable, "-m", "rlhf.evaluate_rm", "--checkpoint", str(reward_run), "--data",
                           f"synthetic={data / 'prefs.jsonl'}", "--out", str(out)], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "length baseline (longer)" in proc.stdout
    result = json.loads((out / "eval_rm.json").read_text())
    assert (out / f"scores_{reward_run.name}.png").stat().st_size > 10_000
    per = result["models"][reward_run.name]["synthetic"]
    buckets = per["per_rating"]
    assert sum(b["pairs"] for b in buckets.values()) == per["pairs"] == result["pairs"]["synthetic"] > 150
    decisive = [buckets[r] for r in RATING_ORDER[:3]]
    accuracy = sum(b["accuracy"] * b["pairs"] for b in decisive) / sum(b["pairs"] for b in decisive)
    assert accuracy >= 0.95, buckets
    margins = [buckets[r]["mean_margin"] for r in RATING_ORDER]
    assert margins[0] > margins[1] > margins[2] > abs(margins[3]), margins
    # The training run's own held-out evaluation agrees with the CLI's.
    own = json.loads((reward_run / "heldout_eval.json").read_text())["prefs"]
    assert own["accuracy"] == pytest.approx(per["accuracy"]) and own["pairs"] == per["pairs"]


def test_sft_then_best_of_k_beats_a_single_sample(reward_run: Path, data: Path) -> None:
    from rlhf.rejection_sampling import main as rejection_sampling
    from rlhf.sft.config import SFTConfig
    from rlhf.sft.train import run_sft
    from train.reference import ReferenceEngine, single_process_topology

    cfg = SFTConfig.from_toml(None, [
        "--model.name=debug_tiny", f"--data.tokenizer={data / 'tok.model'}", "--data.seq_len=128",
        f"--sft.files={data / 'prefs.jsonl'}", "--sft.epochs=1", "--train.global_batch_size=8",
        "--train.micro_batch_size=8", "--train.eval_every=0", "--optim.lr=3e-3", "--optim.warmup_steps=5",
        "--checkpoint.every=0", "--logging.wandb=false", f"--run.dir={data / 'sft'}"])
    _, evaluation = run_sft(cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology,
                            print_fn=lambda *a, **k: None)
    assert evaluation["heldout_loss_after"] < 0.5 * evaluation["heldout_loss_before"], evaluation
    assert_honest_mfu(data / "sft", max_tokens_per_step=8 * 128)
    common = ["--policy", str(data / "sft"), "--reward-model", str(reward_run), "--prompts",
              str(data / "prefs.jsonl"), "--split", "valid", "--max-prompts", "40", "--k", "8", "--temperature",
              "1.0", "--max-new-tokens", "20", "--batch-size", "64"]
    assert rejection_sampling([*common, "--out", str(data / "rs1")]) == 0
    report = json.loads((data / "rs1" / "report.json").read_text())
    assert report["prompts"] == 40 and len(report["best_of_k_curve"]) == 8
    assert report["mean_best_of_k"] > report["mean_first_sample"] + 0.5, report
    assert report["mean_best_of_k"] > report["mean_single_sample"] + 0.5, report
    assert all(b >= a for a, b in zip(report["best_of_k_curve"], report["best_of_k_curve"][1:]))
    assert rejection_sampling([*common, "--seed", "1", "--round", "2", "--previous", str(data / "rs1"),
                               "--out", str(data / "rs2")]) == 0
    first = {json.loads(x)["id"]: json.loads(x) for x in (data / "rs1" / "best.jsonl").read_text().splitlines()}
    second = {json.loads(x)["id"]: json.loads(x) for x in (data / "rs2" / "best.jsonl").read_text().splitlines()}
    assert second.keys() == first.keys()
    assert all(second[i]["score"] >= first[i]["score"] - 1e-4 for i in first), "round 2 keeps the best of both"
    assert {r["round"] for r in second.values()} == {1, 2}


def test_clear_errors_for_bad_input(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf.reward.evaluate import main as evaluate_rm
    from rlhf.reward.train import main as reward
    from rlhf.sft.train import main as sft

    assert reward(["--rm.margins=large"]) == 2
    assert "unknown key 'margins' in [rm]" in capsys.readouterr().err
    assert sft([f"--data.tokenizer={data / 'tok.model'}", f"--sft.files={tmp_path / 'missing.jsonl'}"]) == 2
    assert "sft.files: " in (err := capsys.readouterr().err) and "missing.jsonl does not exist" in err
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    assert sft([f"--data.tokenizer={data / 'tok.model'}", f"--sft.files={tmp_path / 'odd.jsonl'}",
                "--model.name=debug_tiny"]) == 2
    assert "odd.jsonl:1: cannot tell the format from fields ['text']" in capsys.readouterr().err
    assert evaluate_rm(["--checkpoint", str(tmp_path), "--data", str(data / "prefs.jsonl")]) == 2
    assert "no reward_model.json" in capsys.readouterr().err
