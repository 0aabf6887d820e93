"""``python -m rlhf.recipe llama2``: the stages in order with connected directories, finished stages skipped, each
stage's key figure and one summary table. The stages' commands are replaced by a stub that writes what each stage
writes (the real chain at a few steps is ``tests/e2e/test_rlhf_hh.py``'s, stage by stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from rlhf.recipe import RECIPES, run_recipe
from train.config_reader import ConfigError

pytestmark = pytest.mark.timeout(60)


def _arg(cmd: list[str], prefix: str) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(prefix))


def _stub(calls: list[list[str]]) -> object:
    def run(cmd: list[str]) -> int:
        calls.append(cmd)
        module = cmd[cmd.index("-m") + 1]
        if module == "rlhf.evaluate_rm":
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "eval_rm.json").write_text(json.dumps({"length_baseline": {"helpful-base": 0.65}, "models": {
                "rm_helpful": {"helpful-base": {"accuracy": 0.7}, "truncated_sequences": 3}}}))  # evaluate_rm's shape
            (out / "summary.md").write_text("# eval\n")
            return 0
        if module == "rlhf.gatt" and cmd[cmd.index("-m") + 2] == "build":
            out = Path(cmd[cmd.index("--output") + 1])
            out.parent.mkdir(parents=True)
            out.write_text('{"messages": []}\n' * 3)
            return 0
        if module == "rlhf.gatt" and cmd[cmd.index("-m") + 2] == "eval":  # adherence.json's shape
            out = Path(cmd[cmd.index("--output") + 1])
            out.mkdir(parents=True)
            rows = {"before": [1, 0, 0], "after": [4, 3, 1]}
            (out / "adherence.json").write_text(json.dumps({"turns": 3, "dialogues": 4, "models": {
                label: {"adherence": [{"turn": t + 1, "adherent": a, "total": 4, "rate": a / 4}
                                      for t, a in enumerate(hits)]} for label, hits in rows.items()}}))
            return 0
        if module == "rlhf.rejection_sampling":  # report.json as write_outputs writes it (the keys the figure reads)
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "report.json").write_text(json.dumps({
                "prompts": 4, "k": 2, "temperature": 1.0, "split": "train", "round": 1, "reward_models": ["a", "b"],
                "mean_best_of_k": 0.5, "mean_single_sample": 0.25, "gain_best_of_k_over_single": 0.25,
                "best_of_k_curve": [0.2, 0.5], "empty_samples": 0, "prompts_without_answer": 0}))
            return 0
        if module == "rlhf.rounds":  # round_N/summary.json and the table, as rlhf.rounds writes them
            root = Path(_arg(cmd, "--rounds.dir="))
            for n, acc in ((1, 0.55), (2, 0.6)):
                (root / f"round_{n}").mkdir(parents=True)
                (root / f"round_{n}" / "summary.json").write_text(json.dumps({
                    "round": n, "best_of_k_gain": 0.25, "dpo_accuracy": acc, "dpo_accuracy_stderr": 0.05,
                    **({"win_rate_vs_previous": 0.625} if n > 1 else {})}))
            (root / "summary.md").write_text("| round |\n")
            return 0
        run_dir = Path(_arg(cmd, "--run.dir="))
        run_dir.mkdir(parents=True)
        (run_dir / "report").mkdir()
        (run_dir / "report" / "summary.md").write_text("# stub\n")  # train.report's, on a real stage
        if module == "rlhf.sft":
            (run_dir / "sft_eval.json").write_text(json.dumps({"heldout_loss_before": 3.0, "heldout_loss_after": 2.0}))
        elif module == "rlhf.reward":
            (run_dir / "heldout_eval.json").write_text(json.dumps({"h": {"accuracy": 0.66, "length_baseline": 0.6}}))
        elif module == "rlhf.gatt":  # train: a real config.toml and metrics, so train.report can run on it
            from rlhf.gatt.task import GAttConfig

            (run_dir / "config.toml").write_text(GAttConfig().to_toml())
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps({
                "type": "train", "step": i, "loss": 3.0 - i, "lr": 1e-3, "grad_norm": 1.0, "tokens": 64, "mfu": 0.1,
                "tokens_per_s": 100.0, "step_time_s": 0.1, "elapsed_s": float(i)}) + "\n" for i in (1, 2)))
        elif module == "rlhf.ppo":
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "heldout/reward/logit_combined": v})
                                                           + "\n" for i, v in ((0, -1.0), (5, -0.5))))
        return 0
    return run


def test_llama2_recipe_connects_the_stages_and_skips_finished_ones(tmp_path: Path) -> None:
    args = argparse.Namespace(recipe="llama2", pretrained="runs/tiny_real", run_dir=str(tmp_path / "chain"),
                              tokenizer="tok.model", data="data", set=["sft:--train.steps=3", "ppo:--ppo.iterations=2"])
    calls: list[list[str]] = []
    printed: list[str] = []
    rows = run_recipe(args, runner=_stub(calls), print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))))
    assert [r[0] for r in rows] == [s.name for s in RECIPES["llama2"]] == ["sft", "rm_helpful", "rm_safety",
                                                                          "eval_rm", "rs", "ppo", "gatt_data",
                                                                          "gatt", "gatt_eval"]
    chain = tmp_path / "chain"
    sft, rm_h, rm_s, _, rs, ppo, g_data, g_train, g_eval = calls
    assert "--sft.init_checkpoint=runs/tiny_real" in sft and sft[-1] == "--train.steps=3"
    assert f"--rm.init_checkpoint={chain / 'sft'}" in rm_h and f"--rm.init_checkpoint={chain / 'sft'}" in rm_s
    assert {f"--ppo.init={chain / 'sft'}", f"--reward.helpful={chain / 'rm_helpful'}",
            f"--reward.safety={chain / 'rm_safety'}", "--ppo.iterations=2"} <= set(ppo)
    assert rows[0][2] == "held-out answer-token loss 3.0000 -> 2.0000"
    assert rows[5][2] == "held-out LOGIT(Rc) -1.000 -> best -0.500 at iteration 5"
    assert rs[rs.index("--policy") + 1] == str(chain / "sft") and "--tokenizer" not in rs  # from the SFT export
    assert rows[4][2] == "best-of-2 0.500 vs one sample 0.250 (gain +0.250) over 4 prompts"
    assert "mean best-of-k for k = 1..2: 0.200, 0.500" in (chain / "rs" / "summary.md").read_text()
    # GAtt from the PPO run directory (its exported policy), on the data the build stage wrote
    assert g_data[g_data.index("--checkpoint") + 1] == str(chain / "ppo")
    assert {f"--gatt.init={chain / 'ppo'}", f"--data.path={chain / 'gatt_data' / 'gatt.jsonl'}"} <= set(g_train)
    assert g_eval.count("--checkpoint") == 2 and str(chain / "gatt") in g_eval
    assert [r[2] for r in rows[6:]] == [
        "3 GAtt dialogues sampled from the PPO policy (instruction kept in the first user turn only)",
        "last-turn loss 2.0000 -> 1.0000 (2 steps logged)", "adherence at turns 2+: before 0%, after 50%"]
    assert rows[8][3] == "gatt/report/summary.md"
    assert "after" in (chain / "gatt" / "report" / "summary.md").read_text()  # the report now has the adherence
    summary = (chain / "recipe_summary.md").read_text()
    assert "| rm_helpful | ran | h: accuracy 0.660 (length baseline 0.600) | rm_helpful/report/summary.md |" in summary
    assert rows[3][3] == "eval_rm/summary.md"
    # Run again: every stage is finished, nothing runs, the figures are read again.
    again: list[list[str]] = []
    rows2 = run_recipe(args, runner=_stub(again), print_fn=lambda *a, **k: None)
    assert again == [] and all(r[1] == "skipped (finished)" for r in rows2) and rows2[0][2] == rows[0][2]


def test_a_failing_stage_stops_the_chain_and_says_how_to_continue(tmp_path: Path) -> None:
    args = argparse.Namespace(recipe="llama2", pretrained="p", run_dir=str(tmp_path), tokenizer="t", data="d", set=[])
    with pytest.raises(ConfigError, match="stage sft exited 3: fix it and run the same command again"):
        run_recipe(args, runner=lambda cmd: 3, print_fn=lambda *a, **k: None)
    assert not (tmp_path / "sft" / "STAGE_DONE.json").exists()
    with pytest.raises(ConfigError, match="--set 'sfx:--x=1': expected STAGE:ARG"):
        run_recipe(argparse.Namespace(**{**vars(args), "set": ["sfx:--x=1"]}), runner=lambda cmd: 0)


def test_eval_rm_figure_reads_what_evaluate_rm_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluate_rm stage's figure is read from the eval_rm.json that ``rlhf.reward.evaluate`` really writes
    (with a fake scorer): each model's entry has one mapping per test set *and* scalars (``truncated_sequences``),
    which once crashed the driver after the stage had succeeded."""
    from collections import Counter

    import torch

    from rlhf.reward import evaluate as ev

    class Scorer:
        def __init__(self, name: str, bonus: float) -> None:
            self.name, self.bonus, self.meta, self.stats = name, bonus, {"split": {}}, Counter(truncated_left=7)

        def score_pairs(self, pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
            chosen = torch.tensor([float(len(p.chosen)) + self.bonus for p in pairs])
            return chosen, torch.tensor([float(len(p.rejected)) for p in pairs])

    monkeypatch.setattr(ev.RewardScorer, "from_checkpoint",
                        classmethod(lambda cls, path, **k: Scorer(Path(path).name, 100.0 if "help" in path else -100.0)))
    files = []
    for name in ("helpful-base", "harmless-base"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"chosen": f"\n\nHuman: q{i}?\n\nAssistant: {'a' * (i + 1)}",
                                            "rejected": f"\n\nHuman: q{i}?\n\nAssistant: {'b' * (3 - i)}"}) + "\n"
                                for i in range(3)))
        files.append(f"{name}={path}")
    run = tmp_path / "chain"
    ev.evaluate([str(run / "rm_helpful"), str(run / "rm_safety")], files, side="all", out_dir=run / "eval_rm")
    written = json.loads((run / "eval_rm" / "eval_rm.json").read_text())
    assert written["models"]["rm_helpful"]["truncated_sequences"] == 7  # the int that broke the reader
    assert "rm_safety" in (run / "eval_rm" / "summary.md").read_text()  # the table, for the recipe's summary
    figure = next(s for s in RECIPES["llama2"] if s.name == "eval_rm").figure(run)
    assert figure == ("rm_helpful on helpful-base: 1.000 (length baseline 0.500); "
                      "rm_helpful on harmless-base: 1.000 (length baseline 0.500); "
                      "rm_safety on helpful-base: 0.000 (length baseline 0.500); "
                      "rm_safety on harmless-base: 0.000 (length baseline 0.500)")


def test_llama3_recipe_runs_the_rounds_from_its_sft_model_and_reward_model(tmp_path: Path) -> None:
    """The Llama 3 rounds (``rlhf.rounds``) plug into the same driver: SFT -> helpfulness RM -> rounds, the rounds
    started from the recipe's SFT export with its RM, the recipe's tokenizer added to the preset's SFT/DPO overrides."""
    from rlhf.rounds import RoundsConfig

    args = argparse.Namespace(recipe="llama3", pretrained="runs/tiny_real", run_dir=str(tmp_path / "chain"),
                              tokenizer="tok.model", data="data", set=["rounds:--rounds.count=2"])
    calls: list[list[str]] = []
    rows = run_recipe(args, runner=_stub(calls), print_fn=lambda *a, **k: None)
    chain = tmp_path / "chain"
    assert [r[0] for r in rows] == ["sft", "rm_helpful", "rounds"]
    rounds = calls[2]
    assert rounds[rounds.index("-m") + 1] == "rlhf.rounds" and rounds[-1] == "--rounds.count=2"
    assert {f"--rounds.dir={chain / 'rounds'}", f"--rounds.init_checkpoint={chain / 'sft'}",
            f"--rounds.reward_model={chain / 'rm_helpful'}"} <= set(rounds)
    # The overrides parse back through the rounds config: the preset's own first, then the recipe's tokenizer.
    cfg = RoundsConfig.from_toml(rounds[rounds.index("--config") + 1], [a for a in rounds if a.startswith("--rounds.")])
    preset = RoundsConfig.from_toml("configs/rlhf/llama3_rounds_tiny.toml").rounds
    assert cfg.rounds.sft_overrides == [*preset.sft_overrides, "--data.tokenizer=tok.model", "--logging.wandb=false"]
    assert cfg.rounds.dpo_overrides[-2:] == ["--data.tokenizer=tok.model", "--logging.wandb=false"]
    assert cfg.rounds.count == 2 and cfg.rounds.init_checkpoint == str(chain / "sft")
    assert rows[2][2] == ("round 2, best-of-K gain +0.250, DPO held-out implicit-reward accuracy 0.600 +- 0.050, "
                          "win rate vs round 1 0.62")
    assert rows[2][3] == "rounds/summary.md"
    assert "| rounds | ran | round 2," in (chain / "recipe_summary.md").read_text()
