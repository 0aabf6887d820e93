"""``python -m evaluation win-rate``: the statistics, the prompt formats, and a head-to-head judged by a reward model.

The statistics are checked against hand counts and the normal approximation; the command runs two tiny random
models (debug_llama2_tiny, stories260K's tokenizer, Llama 2 chat format) judged by a tiny reward model exported
the way ``python -m rlhf.reward`` exports one, and its recorded scores are re-scored by ``rlhf``'s own
``RewardScorer``. Run: ``pytest tests/unit/test_eval_win_rate.py`` (~15 s; the command tests skip without the
shared data).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from evaluation.cli import main
from evaluation.win_rate import (
    Prompt,
    chat_answers,
    check_judge_independent,
    compare,
    load_chat_model,
    read_prompts,
)
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(300)


def test_counts_ties_and_the_win_rate() -> None:
    summary, outcomes = compare([3.0, 1.0, 2.0, 0.0, 5.0], [1.0, 2.0, 2.05, 0.0, 1.0], tie_margin=0.1,
                                same_answer=[False, False, False, False, True])
    assert outcomes == [1.0, 0.0, 0.5, 0.5, 0.5]  # the last: same answer text is a tie whatever the scores
    assert (summary.wins, summary.ties, summary.losses) == (1, 3, 1)
    assert summary.win_rate == 0.5 and summary.mean_score_difference == pytest.approx((2 - 1 - 0.05 + 0 + 4) / 5)
    assert summary.ci_low <= 0.5 <= summary.ci_high


def test_the_bootstrap_interval_matches_the_normal_approximation() -> None:
    n, wins = 400, 240
    summary, _ = compare([1.0] * wins + [0.0] * (n - wins), [0.5] * n, seed=3)
    half = 1.96 * math.sqrt(0.6 * 0.4 / n)  # 0.048
    assert summary.win_rate == 0.6
    assert summary.ci_low == pytest.approx(0.6 - half, abs=0.01) and summary.ci_high == pytest.approx(0.6 + half,
                                                                                                      abs=0.01)
    all_wins, _ = compare([1.0] * 10, [0.0] * 10)
    assert (all_wins.win_rate, all_wins.ci_low, all_wins.ci_high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="one of each per prompt"):
        compare([1.0], [1.0, 2.0])


def test_prompt_formats_and_errors_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl.gz"
    rows = [{"prompt": "Hi?"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A"},
                          {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
                          {"role": "assistant", "content": "drop me"}]},
            {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant: 6"}]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = read_prompts(path)
    assert prompts[0] == Prompt(turns=[{"role": "user", "content": "Hi?"}])
    assert prompts[1].system == "Be brief." and [t["content"] for t in prompts[1].turns] == ["A", "B", "C"]
    assert [t["content"] for t in prompts[2].turns] == ["What is 2+2?", "4", "And 3+3?"]
    assert len(read_prompts(path, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no \"prompt\""):
        read_prompts(bad)


@pytest.fixture(scope="module")
def models(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny chat models (different seeds), a tiny reward model, stories260K's tokenizer, prompts."""
    from model.checkpoints import save_checkpoint
    from model.config import get_config
    from model.llama import Llama
    from rlhf.reward.model import RewardModel
    from rlhf.scalar_head import save_scalar_model

    tok = require_file(shared_data / "checkpoints/stories260K/tok512.model")
    root = tmp_path_factory.mktemp("win_rate")
    cfg = get_config("debug_llama2_tiny")
    out = {"tokenizer": tok}
    for name, seed in (("policy", 1), ("baseline", 2)):
        torch.manual_seed(seed)
        out[name] = save_checkpoint(Llama(cfg), cfg, root / name / "final_model")
        (out[name] / "rlhf.json").write_text(json.dumps({"tokenizer": str(tok), "template": "llama2"}))
    torch.manual_seed(3)
    rm = RewardModel(Llama(cfg))
    state = {k.removeprefix("model."): v for k, v in rm.state_dict().items()}
    out["judge"] = save_scalar_model(state, cfg, root / "judge", meta={"tokenizer": str(tok), "template": "llama2",
                                                                         "max_len": 256})
    out["prompts"] = root / "prompts.jsonl"
    out["prompts"].write_text("".join(json.dumps({"prompt": f"Tell me about the {thing}."}) + "\n" for thing in
                                      ("sun", "moon", "sea", "dog", "cat", "tree", "king")))
    return out


def _command(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["win-rate", "--policy", str(models["policy"]), "--baseline", str(models["baseline"]), "--judge",
            str(models["judge"]), "--prompts", str(models["prompts"]), "--max-new-tokens", "12", "--batch-size", "3",
            "--output", str(out), *extra]


def test_head_to_head_judged_by_a_reward_model(models: dict[str, Path], tmp_path: Path) -> None:
    from rlhf.reward.scorer import RewardScorer

    assert main(_command(models, tmp_path / "w.json")) == 0
    result = json.loads((tmp_path / "w.json").read_text())
    samples, summary = result["samples"], result["summary"]
    assert len(samples) == 7 and summary["wins"] + summary["ties"] + summary["losses"] == 7
    assert summary["win_rate"] == pytest.approx(sum(s["outcome"] for s in samples) / 7)
    assert summary["ci_low"] <= summary["win_rate"] <= summary["ci_high"]
    for s in samples:
        assert s["outcome"] == (0.5 if s["policy"] == s["baseline"] or s["policy_score"] == s["baseline_score"]
                                else float(s["policy_score"] > s["baseline_score"]))
    # The recorded scores are the reward model's own on the recorded answers.
    scorer = RewardScorer.from_checkpoint(models["judge"])
    rescored = scorer.score([s["prompt"] for s in samples], [s["policy"] for s in samples])
    assert torch.allclose(rescored, torch.tensor([s["policy_score"] for s in samples]), atol=1e-5)
    # An answer does not depend on the batch it was generated in (one prompt alone gives the same text).
    model, tok, template = load_chat_model(models["policy"], tokenizer=None, template=None)
    alone = chat_answers(model, tok, [Prompt(turns=samples[4]["prompt"])], template=template, max_new_tokens=12)
    assert alone == [samples[4]["policy"]] and any(s["policy"] for s in samples)


def test_a_model_against_itself_ties_everywhere(models: dict[str, Path], tmp_path: Path) -> None:
    command = _command(models, tmp_path / "w.json", "--temperature", "1.0", "--limit", "3")
    command[command.index("--baseline") + 1] = str(models["policy"])
    assert main(command) == 0
    summary = json.loads((tmp_path / "w.json").read_text())["summary"]
    assert (summary["ties"], summary["win_rate"], summary["ci_low"], summary["ci_high"]) == (3, 0.5, 0.5, 0.5)


def test_a_judge_the_ppo_policy_was_trained_on_is_refused(models: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "ppo"
    (run / "final_policy").mkdir(parents=True)
    (run / "ppo_config.toml").write_text(f'[reward]\nhelpful = "{models["judge"]}"\n')
    with pytest.raises(ValueError, match=r"reward.helpful of the PPO run .*optimised against it"):
        check_judge_independent(run / "final_policy", models["judge"])
    check_judge_independent(run / "final_policy", models["baseline"])  # another model is fine
    command = _command(models, tmp_path / "w.json")
    command[command.index("--policy") + 1] = str(run / "final_policy")
    assert main(command) == 2
    assert "cannot judge the policy" in capsys.readouterr().err and not (tmp_path / "w.json").exists()
