"""``python -m train.report`` on every run kind (pretrain, SFT, RM, PPO, GAtt): a summary.md that lists exactly the
plots written, the stage's own figures, the named held-out loss, and no perplexity for a ranking loss.

The run directories are written here (config.toml from each stage's config class, metrics.jsonl records in the
loop's / PPO's format, the stage's JSON results), so the test needs no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.gatt.task import GAttConfig
from rlhf.ppo.config import PPOConfig
from rlhf.reward.config import RewardConfig
from rlhf.sft.config import SFTConfig
from train.config import RunConfig
from train.report import main as report_main

pytestmark = pytest.mark.timeout(120)


def _train_records(n: int = 4) -> list[dict]:
    return [{"type": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens": 512,
             "tokens_per_s": 1000.0, "tflops_per_device": 0.01, "mfu": 0.02, "peak_flops": 1e11,
             "step_time_s": 0.5, "elapsed_s": float(s)} for s in range(1, n + 1)]


def _validation(name: str, *, ppl: bool) -> dict:
    rec = {"type": "validation", "step": 4, "val_loss": 0.6931, "val_name": name}
    return {**rec, "val_ppl": 2.0} if ppl else rec


def _run_dir(root: Path, kind: str) -> Path:
    run = root / kind
    run.mkdir()
    from rlhf.distill.config import DistillConfig
    from rlhf.dpo.config import DPOConfig

    cls = {"pretrain": RunConfig, "sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "gatt": GAttConfig,
           "dpo": DPOConfig, "distill": DistillConfig}[kind]
    cfg = cls()
    if kind == "sft":  # SFT and RM runs read their own files, not data.path: the summary names them
        cfg = cfg.replace(sft={"files": "{data_dir}/a.jsonl"})
    elif kind == "rm":
        cfg = cfg.replace(rm={"helpful_files": "h.jsonl", "safety_files": "s.jsonl"})
    (run / ("ppo_config.toml" if kind == "ppo" else "config.toml")).write_text(cfg.to_toml())
    if kind == "ppo":
        records = [{"type": "ppo", "step": i, "reward/combined": 0.5 + 0.01 * i, "kl": 0.1 * i,
                    "heldout/reward/logit_combined": [0.1, 0.4, 0.3][i - 1]} for i in (1, 2, 3)]
    else:
        records = _train_records()
        if kind == "rm":
            records.append(_validation("held-out ranking loss", ppl=False))
        elif kind == "sft":
            records.append(_validation("held-out answer-token loss", ppl=True))
        else:
            records.append(_validation("held-out next-token loss", ppl=True))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if kind == "sft":
        (run / "sft_eval.json").write_text(json.dumps({"heldout_loss_before": 2.5, "heldout_loss_after": 1.25,
                                                       "heldout_answer_tokens": 900, "heldout_rows": 12}))
    if kind == "rm":
        per = {"significantly_better": {"pairs": 5, "accuracy": 0.8, "mean_margin": 1.0, "length_baseline": 0.6}}
        (run / "heldout_eval.json").write_text(json.dumps({
            "helpful": {"pairs": 10, "accuracy": 0.7, "length_baseline": 0.6, "mean_margin": 0.5, "per_rating": per},
            "harmless": {"pairs": 10, "accuracy": 0.45, "length_baseline": 0.55, "mean_margin": -0.1,
                         "per_rating": {}}}))
    if kind == "dpo":  # rlhf.dpo's dpo_eval.json
        (run / "dpo_eval.json").write_text(json.dumps({
            "heldout_pairs": 40, "accuracy": 0.625, "accuracy_stderr": 0.0766, "ties": 1, "mean_margin": 0.25,
            "mean_chosen_reward": 0.1, "mean_rejected_reward": -0.15}))
    if kind == "distill":  # rlhf.distill's distill_eval.json
        (run / "distill_eval.json").write_text(json.dumps({"student_loss": 3.25, "teacher_loss": 1.5, "kl": 1.86,
                                                           "argmax_agreement": 0.298}))
    if kind == "gatt":
        (run / "eval").mkdir()
        (run / "eval" / "adherence.json").write_text(json.dumps({"models": {
            "before": {"adherence": [{"rate": 1.0}, {"rate": 0.25}]},
            "after": {"adherence": [{"rate": 1.0}, {"rate": 0.75}]}}}))
    return run


@pytest.mark.parametrize("kind", ["pretrain", "sft", "rm", "ppo", "gatt", "dpo", "distill"])
def test_report_for_every_run_kind_lists_only_what_it_wrote(kind: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path, kind)
    assert report_main([str(run)]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert f"- run kind: {kind}" in summary
    plots_line = next(line for line in summary.splitlines() if line.startswith("Plots: "))
    listed = set(plots_line.removeprefix("Plots: ").split(", "))
    written = {p.name for p in (run / "report").glob("*.png")}
    assert listed == written, (listed, written)
    expected = {"pretrain": {"loss.png", "throughput.png", "lr.png", "grad_norm.png", "all_metrics.png"},
                "ppo": {"ppo.png", "all_metrics.png"}}
    assert expected.get(kind, set()) <= written
    figures = {
        "pretrain": ["held-out next-token loss: final 0.6931 (perplexity 2.00)"],
        "sft": ["## SFT", "over all 12 held-out rows", "before 2.5000, after 1.2500", "- data: {data_dir}/a.jsonl, "],
        "rm": ["| helpful | 10 | 0.700 | 0.600 | 0.500 |", "significantly_better", "WEAK: harmless",
               "held-out ranking loss: final 0.6931 at step 4", "- data: h.jsonl, s.jsonl, seq_len"],
        "ppo": ["## PPO", "best 0.400 at iteration 2", "KL to the reference last 0.300"],
        "gatt": ["## GAtt adherence", "| after | 1.00 | 0.75 |"],
        "dpo": ["## DPO (held-out pairs)", "implicit-reward accuracy 0.625 +- 0.077 over 40 pairs (1 ties)"],
        "distill": ["## Distillation (held-out)", "student loss 3.2500 (teacher 1.5000), forward KL to the teacher "
                    "1.8600, argmax agreement 0.298"],
    }[kind]
    for text in figures:
        assert text in summary, (text, summary)
    if kind == "rm":
        assert "perplexity" not in summary and "rm_accuracy.png" in written
