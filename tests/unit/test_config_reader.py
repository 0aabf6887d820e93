"""The one config reader (``train/config_reader.py``) of every stage, and ``--help`` generated from it.

    pytest tests/unit/test_config_reader.py

Every stage's root config is the run sections plus its own: pretraining (``RunConfig``), SFT, reward models,
GAtt and PPO are read, overridden, serialised and validated by the same code; every entry point's ``--help``
lists every section and key with its type, this stage's default and its docstring.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

import pytest

from rlhf.gatt.task import GAttConfig
from rlhf.ppo.config import PPOConfig
from rlhf.reward.config import RewardConfig
from rlhf.sft.config import SFTConfig
from train.config import RunConfig
from train.config_reader import ConfigError, RootConfig, field_docs, toml_value

pytestmark = pytest.mark.timeout(120)

STAGE_CONFIGS = [RunConfig, SFTConfig, RewardConfig, GAttConfig, PPOConfig]


def test_every_stage_config_is_the_run_sections_plus_its_own() -> None:
    shared = RunConfig.sections()
    for cls in STAGE_CONFIGS:
        assert issubclass(cls, RunConfig) and issubclass(cls, RootConfig)
        # PPO's [eval] is its own (held-out rewards every N iterations), in place of the run's in-loop benchmarks.
        replaced = {"eval"} if cls is PPOConfig else set()
        assert {k: v for k, v in cls.sections().items() if k in shared and k not in replaced} == {
            k: v for k, v in shared.items() if k not in replaced}, cls.__name__
    assert set(SFTConfig.sections()) - set(shared) == {"sft", "lora"}  # [lora]: every StageConfig stage
    assert set(RewardConfig.sections()) - set(shared) == {"rm", "lora"}
    assert set(GAttConfig.sections()) - set(shared) == {"gatt"}
    assert set(PPOConfig.sections()) - set(shared) == {"ppo", "reward", "prompts", "rollout", "guards"}
    assert PPOConfig.sections()["eval"] is not shared["eval"]


@pytest.mark.parametrize("cls", STAGE_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring_and_the_toml_round_trips(cls: type[RunConfig], tmp_path: Path) -> None:
    for name, section in cls.sections().items():
        missing = [f.name for f in dataclasses.fields(section) if not field_docs(section).get(f.name)]
        assert missing == [], f"{cls.__name__} [{name}]: fields without a docstring"
    cfg = cls.from_toml(None, ["--model.overrides.vocab_size=1024", "--run.dir=runs/x"])
    cfg.save_toml(tmp_path / "c.toml")
    assert cls.from_toml(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize("cls", STAGE_CONFIGS, ids=lambda c: c.__name__)
def test_errors_quote_the_value_and_name_the_fix(cls: type[RunConfig], tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[train\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        cls.from_toml(tmp_path / "bad.toml")
    (tmp_path / "flat.toml").write_text("train = 3\n")
    with pytest.raises(ConfigError, match=r"\[train\] must be a table, got 3"):
        cls.from_toml(tmp_path / "flat.toml")
    with pytest.raises(ConfigError, match=rf"does not exist; presets are in {cls.PRESETS}"):
        cls.from_toml(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' in \[train\].*did you mean 'steps'"):
        cls.from_toml(None, ["--train.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*did you mean 'train'"):
        cls.from_toml(None, ["--trian.steps=3"])
    with pytest.raises(ConfigError, match=r"train.seed: expected an integer, got 'x'"):
        cls.from_toml(None, ["--train.seed=x"])
    with pytest.raises(ConfigError, match=r"unknown \[model.overrides\] key\(s\) \['dimm'\]"):
        cls.from_toml(None, ["--model.overrides.dimm=3"])
    assert issubclass(ConfigError, ValueError)  # callers that catch ValueError keep working


def test_a_stage_sets_its_own_defaults_of_the_shared_sections() -> None:
    assert RunConfig().train.steps == 100 and SFTConfig().train.steps == 0 and RewardConfig().train.steps == 0
    assert SFTConfig.from_toml(None, ["--train.seed=3"]).train.steps == 0  # omitted keys keep the stage's default
    ppo = PPOConfig()
    assert (ppo.optim.lr, ppo.optim.warmup_steps, ppo.train.global_batch_size, ppo.run.dir) == (
        1e-6, 0, 64, "runs/ppo")


def test_moved_and_unused_keys_are_refused_with_the_new_place() -> None:
    with pytest.raises(ConfigError, match=r"policy.init is now ppo.init.*--ppo.init=VALUE"):
        PPOConfig.from_toml(None, ["--policy.init=runs/sft"])
    with pytest.raises(ConfigError, match=r"ppo.minibatch_size is now train.global_batch_size"):
        PPOConfig.from_dict({"ppo": {"minibatch_size": 8}})
    with pytest.raises(ConfigError, match=r"policy.overrides is now model.overrides"):
        PPOConfig.from_toml(None, ["--policy.overrides.dim=8"])
    ok = ["--reward.helpful=constant:0.5"]
    PPOConfig.from_toml(None, ok).validate()
    with pytest.raises(ConfigError, match=r"train.steps=7 has no effect in this stage"):
        PPOConfig.from_toml(None, [*ok, "--train.steps=7"]).validate()
    with pytest.raises(ConfigError, match=r"data.split='9,1,0' has no effect"):
        GAttConfig.from_toml(None, ["--data.tokenizer=t.model", "--data.split=9,1,0"]).validate()


def _help(main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _entry_points() -> list[tuple[str, Callable[[list[str]], object], list[str], type[RootConfig]]]:
    from rlhf.gatt.cli import main as gatt
    from rlhf.ppo.trainer import main as ppo
    from rlhf.reward.train import main as reward
    from rlhf.sft.train import main as sft
    from train.__main__ import main as pretrain

    return [("python -m train", pretrain, [], RunConfig), ("python -m rlhf.sft", sft, [], SFTConfig),
            ("python -m rlhf.reward", reward, [], RewardConfig), ("python -m rlhf.ppo", ppo, [], PPOConfig),
            ("python -m rlhf.gatt train", gatt, ["train"], GAttConfig)]


@pytest.mark.parametrize("index", range(5), ids=["train", "rlhf.sft", "rlhf.reward", "rlhf.ppo", "rlhf.gatt train"])
def test_help_lists_every_key_with_type_default_and_doc(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    prog, main, argv, cls = _entry_points()[index]
    text = _help(main, argv, capsys)
    assert "--section.key=VALUE" in text and f"Example:\n  {prog} --config configs/" in text
    defaults = cls()
    for name, section in cls.sections().items():
        assert f"[{name}]" in text
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            hint = hints[f.name]
            # ``bool | None`` (a tri-state such as parallel.sequence_parallel) prints as written; plain types by name.
            kind = "table" if typing.get_origin(hint) is dict else getattr(hint, "__name__", str(hint))
            line = f"--{name}.{f.name} ({kind}, default {toml_value(getattr(getattr(defaults, name), f.name))})"
            assert line in text, line
            doc = (cls.DOCS.get(f"{name}.{f.name}") or field_docs(section)[f.name]).split()
            assert " ".join(doc[:4]) in " ".join(text.split()), f"{name}.{f.name}: docstring missing"


def _flag_entry_points() -> dict[str, tuple[Callable[[list[str]], object], list[str]]]:
    from rlhf.average import main as average
    from rlhf.gatt.cli import main as gatt
    from rlhf.merge_lora import main as merge_lora
    from rlhf.recipe import main as recipe
    from rlhf.rejection_sampling import main as rejection_sampling
    from rlhf.reward.evaluate import main as evaluate_rm

    return {"rlhf.evaluate_rm": (evaluate_rm, []), "rlhf.rejection_sampling": (rejection_sampling, []),
            "rlhf.gatt build": (gatt, ["build"]), "rlhf.gatt eval": (gatt, ["eval"]),
            "rlhf.average": (average, []), "rlhf.merge_lora": (merge_lora, []), "rlhf.recipe": (recipe, [])}


@pytest.mark.parametrize("name", list(_flag_entry_points()))
def test_flag_cli_help_explains_every_flag_with_its_default_and_an_example(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The flag CLIs (no typed config): every flag has a help text, every optional flag shows its default, and the
    description carries an example command."""
    import argparse

    main, argv = _flag_entry_points()[name]
    captured: list[argparse.ArgumentParser] = []
    real_parse = argparse.ArgumentParser.parse_known_args

    def spy(self: argparse.ArgumentParser, *a: object, **k: object) -> object:
        captured.append(self)
        return real_parse(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_known_args", spy)
        text = _help(main, argv, capsys)
    assert f"python -m {name.split()[0]} {' '.join(argv)}".strip() in text, "no example command"
    parser = captured[-1]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        flag = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"{name} {flag}: no help text"
        if not action.required and action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in " ".join(text.split()), f"{name} {flag}: default not shown"
