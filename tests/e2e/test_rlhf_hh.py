"""The alignment pipeline on the real HH-RLHF samples, small: a real pretrained tiny Llama (stories260K, the
llama2.c model in the shared data) -> SFT -> helpfulness and safety reward models -> the 2x2 evaluation ->
best-of-K on held-out prompts. Skips when the shared data is absent.

The first 200 pairs of each file (helpful-base, harmless-base) are split by the hash of the prompt; everything
is trained on the train side (128-token sequences) and evaluated on held-out pairs (``rlhf.sources``). Checks:

- ``python -m rlhf.sft`` (DeepSpeed, one process) lowers the held-out answer-token loss of the chosen dialogues;
- both reward models train on their Llama 2 mixtures (helpful + as many safety pairs; safety 90/10) and the 2x2
  table + length baseline are computed on held-out pairs of both files;
- best-of-8 samples of the SFT model beat a single sample under the helpfulness RM on held-out prompts.

How good a 260K-parameter story model gets on HH-RLHF is *not* asserted here: the full-size experiment
(a 15M model pretrained on Wikipedia/C4/CommonCrawl, all pairs) is ``benchmarks/rlhf_hh_tiny.py``, its
numbers in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
N = 200
SEQ = 128
EVAL_PAIRS = 120


@pytest.fixture(scope="module")
def real(shared_data: Path) -> dict[str, Path]:
    paths = {"init": shared_data / "checkpoints/stories260K/stories260K.bin",
             "tok": shared_data / "checkpoints/stories260K/tok512.model",
             "helpful": shared_data / "preferences/hh-rlhf/helpful-base/test.jsonl.gz",
             "harmless": shared_data / "preferences/hh-rlhf/harmless-base/test.jsonl.gz"}
    for p in paths.values():
        require_file(p)
    return paths


@pytest.fixture(scope="module")
def sft_run(real: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("hh") / "sft"
    cmd = [sys.executable, "-m", "rlhf.sft", f"--sft.init_checkpoint={real['init']}", f"--data.tokenizer={real['tok']}",
           f"--sft.files={real['helpful']},{real['harmless']}", f"--sft.max_records_per_file={N}",
           f"--data.seq_len={SEQ}", "--train.global_batch_size=16", "--train.micro_batch_size=8",
           "--train.eval_every=0", "--optim.lr=2e-3", "--optim.warmup_steps=3", "--checkpoint.every=0",
           "--logging.wandb=false", f"--run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run


def test_sft_lowers_heldout_answer_loss(sft_run: Path) -> None:
    evaluation = json.loads((sft_run / "sft_eval.json").read_text())
    assert evaluation["heldout_answer_tokens"] > 1000
    assert evaluation["heldout_loss_after"] < evaluation["heldout_loss_before"] - 0.2, evaluation
    report = json.loads((sft_run / "data_report.json").read_text())
    assert any(f"first {N} of 2348 records" in f for f in report["files"]), report["files"]
    assert json.loads((sft_run / "final_model" / "rlhf.json").read_text())["template"] == "llama2"


@pytest.fixture(scope="module")
def reward_runs(real: dict[str, Path], sft_run: Path) -> dict[str, Path]:
    from rlhf.reward.config import RewardConfig
    from rlhf.reward.train import run_reward
    from train.reference import ReferenceEngine, single_process_topology

    runs = {}
    for kind in ("helpfulness", "safety"):
        cfg = RewardConfig.from_toml(REPO_ROOT / f"configs/rlhf/rm_{kind}_hh_tiny.toml", [
            f"--rm.init_checkpoint={sft_run}", f"--data.tokenizer={real['tok']}",
            f"--rm.helpful_files={real['helpful']}", f"--rm.safety_files={real['harmless']}",
            f"--rm.max_records_per_file={N}", f"--data.seq_len={SEQ}", "--optim.lr=1e-3", "--train.eval_every=0",
            f"--run.dir={sft_run.parent / ('rm_' + kind)}"])
        result, _ = run_reward(cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology,
                               print_fn=lambda *a, **k: None)
        assert result.reason == "completed"
        runs[kind] = cfg.run_dir
    return runs


def test_two_by_two_table_on_the_heldout_pairs(real: dict[str, Path], reward_runs: dict[str, Path]) -> None:
    from rlhf.reward.evaluate import evaluate, format_table, length_baseline
    from rlhf.sources import load_pairs

    mixes = {k: json.loads((r / "data_report.json").read_text()) for k, r in reward_runs.items()}
    helpful_train = mixes["helpfulness"]["train_mixture"]
    assert helpful_train["safety"] == helpful_train["helpful"] > 100  # helpful + as many safety pairs
    safety_train = mixes["safety"]["train_mixture"]
    assert safety_train["helpful"] == round(safety_train["safety"] / 9)  # 90 / 10
    out = reward_runs["helpfulness"].parent / "eval"
    result = evaluate([str(reward_runs["helpfulness"]), str(reward_runs["safety"])],
                      [str(real["helpful"]), str(real["harmless"])], side="valid", out_dir=out, max_pairs=EVAL_PAIRS)
    print(format_table(result))
    split = result["split_settings"]
    for name, path, is_safety in (("helpful-base", real["helpful"], False), ("harmless-base", real["harmless"], True)):
        sp = load_pairs(path, is_safety=is_safety, valid_fraction=split["valid_fraction"], seed=split["seed"])
        assert len(sp.valid) > EVAL_PAIRS and result["pairs"][name] == EVAL_PAIRS  # the first held-out pairs
        assert result["length_baseline"][name] == pytest.approx(length_baseline(sp.valid[:EVAL_PAIRS]))
        for model in ("rm_helpfulness", "rm_safety"):
            acc = result["models"][model][name]["accuracy"]
            assert 0.0 <= acc <= 1.0 and result["models"][model][name]["pairs"] == EVAL_PAIRS
    a, b = (result["models"][m]["helpful-base"]["mean_chosen_score"] for m in ("rm_helpfulness", "rm_safety"))
    assert a != b, "two differently trained reward models"
    assert (out / "scores_rm_safety.png").is_file() and (out / "eval_rm.json").is_file()


def test_best_of_8_beats_one_sample_on_heldout_prompts(real: dict[str, Path], sft_run: Path,
                                                       reward_runs: dict[str, Path]) -> None:
    from rlhf.rejection_sampling import main as rejection_sampling

    out = sft_run.parent / "rs"
    assert rejection_sampling(["--policy", str(sft_run), "--reward-model", str(reward_runs["helpfulness"]),
                               "--safety-reward-model", str(reward_runs["safety"]), "--prompts", str(real["helpful"]),
                               str(real["harmless"]), "--split", "valid", "--max-prompts", "12", "--k", "8",
                               "--temperature", "1.0", "--max-new-tokens", "32", "--batch-size", "64",
                               "--allow-weak-rm", "--out", str(out)]) == 0  # tiny RMs: the mechanics
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == 24
    assert report["mean_best_of_k"] > report["mean_first_sample"] and report["gain_best_of_k_over_single"] > 0
