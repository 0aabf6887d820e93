"""Gates between stages (``rlhf.reward.gate``): PPO and rejection sampling refuse a reward model whose held-out
accuracy is at or below chance or below the length baseline unless asked; a missing reward-model path names its
key and says it does not exist."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.ppo.config import PPOConfig
from rlhf.ppo.trainer import PPOTrainer
from rlhf.rejection_sampling import main as rejection_sampling
from rlhf.reward.gate import check_reward_model
from train.config_reader import ConfigError

pytestmark = pytest.mark.timeout(60)


def _rm_run(root: Path, accuracy: float, baseline: float) -> Path:
    run = root / f"rm_{accuracy}"
    (run / "final_model").mkdir(parents=True)
    (run / "heldout_eval.json").write_text(json.dumps({"helpful-base": {
        "pairs": 200, "accuracy": accuracy, "length_baseline": baseline, "mean_margin": 0.0}}))
    return run


def test_weak_reward_models_are_refused_unless_allowed(tmp_path: Path) -> None:
    strong = _rm_run(tmp_path, 0.71, 0.6)
    check_reward_model(strong, key="reward.helpful", allow_weak=False, flag="--allow-weak-rm")
    check_reward_model(strong / "final_model", key="reward.helpful", allow_weak=False, flag="--allow-weak-rm")
    for accuracy, baseline in ((0.5, 0.4), (0.61, 0.656)):  # chance; below the length baseline
        weak = _rm_run(tmp_path, accuracy, baseline)
        with pytest.raises(ConfigError, match=rf"reward.helpful='.*rm_{accuracy}' is a weak reward model .*"
                                              rf"accuracy {accuracy:.3f} on 200 held-out pairs .* length baseline "
                                              rf"{baseline:.3f}.*pass --reward.allow_weak_rm=true"):
            check_reward_model(weak, key="reward.helpful", allow_weak=False, flag="--reward.allow_weak_rm=true")
        with pytest.warns(UserWarning, match="weak reward model"):
            check_reward_model(weak, key="reward.helpful", allow_weak=True, flag="--reward.allow_weak_rm=true")
    (tmp_path / "elsewhere").mkdir()
    with pytest.warns(UserWarning, match="no heldout_eval.json beside it"):
        check_reward_model(tmp_path / "elsewhere", key="reward.helpful", allow_weak=False, flag="x")


def test_ppo_names_the_key_of_a_missing_or_weak_reward_model(tmp_path: Path) -> None:
    cfg = PPOConfig.from_toml(None, [f"--reward.helpful={tmp_path / 'rm_helpfull'}"])
    fake = SimpleNamespace(cfg=cfg, tokenizer=None, model_cfg=cfg.model_config())
    with pytest.raises(ConfigError, match=r"reward.helpful='.*rm_helpfull' does not exist: give a reward-model run"):
        PPOTrainer._scorer(fake, cfg.reward.helpful, key="reward.helpful")
    weak = _rm_run(tmp_path, 0.42, 0.656)
    with pytest.raises(ConfigError, match=r"reward.safety=.* is a weak reward model"):
        PPOTrainer._scorer(fake, str(weak), key="reward.safety")


def test_rejection_sampling_refuses_before_loading_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weak = _rm_run(tmp_path, 0.5, 0.6)
    common = ["--policy", str(tmp_path / "no_policy"), "--prompts", "x.jsonl", "--out", str(tmp_path / "rs")]
    assert rejection_sampling([*common, "--reward-model", str(tmp_path / "rm_missing")]) == 2
    assert "--reward-model " in (err := capsys.readouterr().err) and "rm_missing does not exist" in err
    assert rejection_sampling([*common, "--reward-model", str(weak)]) == 2
    assert "is a weak reward model" in (err := capsys.readouterr().err) and "--allow-weak-rm" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rejection_sampling([*common, "--reward-model", str(weak), "--allow-weak-rm"]) == 2
    assert "no_policy does not exist" in capsys.readouterr().err  # past the gate, stopped at the policy


def test_gatt_build_samples_by_default_and_refuses_degenerate_answers() -> None:
    from rlhf.gatt.cli import _parser, degenerate_answers

    assert _parser().parse_args(["build", "--checkpoint", "c", "--tokenizer", "t", "--dialogues", "d",
                                 "--output", "o"]).temperature > 0
    assert "75 of 75 answers are empty or punctuation only" in degenerate_answers(["....."] * 75)
    assert "3 of 4 answers are the same string 'I am a cat.'" in degenerate_answers(["I am a cat."] * 3 + ["Hi"])
    assert degenerate_answers(["Paris.", "Blue, like the sea.", "Seven.", "I am a cat."]) == ""
