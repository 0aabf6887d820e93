"""An alignment stage left with zero usable records writes its ``data_report.json`` (what was skipped and why)
before it stops, with a ``ConfigError`` that points at the report (issue 13 item 7).

    pytest tests/unit/test_rlhf_data_report.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.synthetic import synthetic_tokenizer
from train.config_reader import ConfigError

pytestmark = pytest.mark.timeout(120)

BAD_DIALOGUES = [
    {"messages": []},                                                     # empty
    {"messages": [{"role": "user", "content": "only a question"}]},       # no answer
    {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # unknown role
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _skipped(readers: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in readers:
        for reason, n in r["skipped"].items():
            out[reason] = out.get(reason, 0) + n
    return out


def test_sft_without_usable_dialogues_reports_every_skip(tmp_path: Path, tok_path: Path) -> None:
    from rlhf.sft.config import SFTConfig
    from rlhf.sft.train import SFTTask

    data = _jsonl(tmp_path / "bad.jsonl", BAD_DIALOGUES)
    cfg = SFTConfig.from_toml(None, ["--model.name=debug_tiny", f"--data.tokenizer={tok_path}",
                                     f"--sft.files={data}", f"--run.dir={tmp_path / 'run'}", "--sft.valid_fraction=0"])
    with pytest.raises(ConfigError, match=r"do not fill one global batch.*data_report.json"):
        SFTTask(cfg).resolve(world_size=1)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    (reader,) = report["readers"]
    assert reader["read"] == 3 and reader["kept"] == 0 and sum(reader["skipped"].values()) == 3
    assert {e["line"] for e in reader["skip_examples"]} == {1, 2, 3}
    assert all(e["file"] == str(data) and e["reason"] for e in reader["skip_examples"])


def test_reward_model_without_usable_pairs_reports_every_skip(tmp_path: Path, tok_path: Path) -> None:
    from rlhf.reward.config import RewardConfig
    from rlhf.reward.train import RewardTask

    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "", "rejected": "b"},
                                              {"prompt": "q", "chosen": "a", "rejected": "a"}])
    cfg = RewardConfig.from_toml(None, ["--model.name=debug_tiny", f"--data.tokenizer={tok_path}",
                                        f"--rm.helpful_files={data}", f"--run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="data_report.json"):
        RewardTask(cfg).resolve(world_size=1)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["readers"][0]["kept"] == 0 and sum(_skipped(report["readers"]).values()) == 2


def test_ppo_prompt_set_reports_what_each_file_gave(tmp_path: Path, tok_path: Path) -> None:
    from model.tokenizer import load_tokenizer
    from rlhf.ppo.prompts import prompt_set, split_heldout

    data = _jsonl(tmp_path / "prompts.jsonl", [*BAD_DIALOGUES, {"messages": [{"role": "user", "content": "hi"}]}])
    report: dict = {}
    prompts = prompt_set(SimpleNamespace(source=str(data), template="llama2", max_tokens=64),
                         tokenizer=load_tokenizer(tok_path), vocab_size=512, seed=0, print_fn=lambda *a: None,
                         report=report)
    assert len(prompts) == 2 and report["unique_prompts"] == 2  # "only a question" and "hi"
    assert report["readers"][0]["read"] == 4 and sum(report["readers"][0]["skipped"].values()) == 2
    with pytest.raises(ConfigError, match="prompts.heldout=8"):
        split_heldout(prompts, n=8)


def test_rejection_sampling_without_prompts_reports_before_stopping(tmp_path: Path) -> None:
    from rlhf.rejection_sampling import read_prompt_files

    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "", "rejected": "b"}])
    args = argparse.Namespace(prompts=[str(data)], split="all", max_prompts=0, out=str(tmp_path / "rs"))
    with pytest.raises(ConfigError, match=r"no prompts on the 'all' side.*data_report.json"):
        read_prompt_files(args, split={"valid_fraction": 0.1, "seed": "s"})
    report = json.loads((tmp_path / "rs" / "data_report.json").read_text())
    assert report["readers"][0]["read"] == 1 and report["readers"][0]["kept"] == 0


def test_gatt_without_usable_examples_reports_before_stopping(tmp_path: Path, tok_path: Path) -> None:
    from rlhf.gatt.task import GAttConfig, GAttTask

    data = _jsonl(tmp_path / "gatt.jsonl", [{"messages": [{"role": "user", "content": "q"}]},
                                             {"messages": [{"role": "user", "content": "q " * 50},
                                                           {"role": "assistant", "content": "a " * 50}]}])
    cfg = GAttConfig.from_toml(None, [f"--data.path={data}", f"--data.tokenizer={tok_path}", "--data.seq_len=16",
                                      "--gatt.valid_fraction=0", "--gatt.truncate=none"])
    with pytest.raises(ConfigError, match="no example fits data.seq_len=16"):
        GAttTask(cfg.gatt).build_datasets(cfg, cfg.model_config(), dp_size=1, run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["dialogues"] == 2 and report["train"] == {"skipped: does not end with an assistant turn": 1,
                                                            "kept": 1}
    assert report["train examples longer than data.seq_len=16 (dropped)"] == 1


def test_validation_switched_off_is_said_before_training(tmp_path: Path, tok_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Too few held-out records for one validation batch: the note is printed when the stage starts, not only
    written to data_report.json (issue 23, item 8 of what was found)."""
    import train.loop
    from rlhf.sft.config import SFTConfig
    from rlhf.sft.train import SFTTask
    from rlhf.stage import run_stage

    good = [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": f"answer {i}."}]} for i in range(40)]
    data = _jsonl(tmp_path / "good.jsonl", good)
    cfg = SFTConfig.from_toml(None, ["--model.name=debug_tiny", f"--data.tokenizer={tok_path}", f"--sft.files={data}",
                                     f"--run.dir={tmp_path / 'run'}", "--sft.valid_fraction=0",
                                     "--train.eval_every=5"])
    seen: list[object] = []
    monkeypatch.setattr(train.loop, "train", lambda cfg, **kw: seen.append(cfg))
    printed: list[str] = []
    run_stage(cfg, SFTTask(cfg), print_fn=printed.append)
    (resolved,) = seen
    assert resolved.train.eval_every == 0  # switched off...
    notes = [line for line in printed if line.startswith("[sft] note: validation:")]
    assert len(notes) == 1 and notes[0].endswith("(validation off)"), printed  # ...and said so on the console
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["notes"] == [notes[0][len("[sft] note: "):]]
