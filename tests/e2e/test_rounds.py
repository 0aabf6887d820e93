"""``python -m rlhf.rounds``: two rounds of rejection sampling -> SFT -> DPO (two variants) -> averaging end to end
on CPU, then a rerun that redoes nothing (run: ``pytest tests/e2e/test_rounds.py``).

Tiny everything: the synthetic preference set and tokenizer, ``debug_tiny``, 2 optimizer steps per stage. The stage
subprocesses use the plain-PyTorch engine through the loop's test hooks (``LLAMA_TRAIN_ENGINE``), so the test checks
the driver (commands, order, resumability, summary), not DeepSpeed, which the stage tests cover.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.distributed.rlhf_parity_config import make_parity_data, rlhf_parity_config, run_stage_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def test_two_rounds_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train.reference import ReferenceEngine, single_process_topology

    data = make_parity_data(tmp_path / "data")
    (data / "init" / "rlhf.json").write_text(json.dumps({"tokenizer": str(data / "tok.model"), "template": "llama2"}))
    rm_cfg = rlhf_parity_config("rm", data, [f"--run.dir={tmp_path / 'rm'}", "--train.steps=2"])
    run_stage_config("rm", rm_cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology)
    small = ["--train.global_batch_size=4", "--train.micro_batch_size=2", "--data.seq_len=96", "--train.eval_every=0",
             "--checkpoint.every=0", "--logging.wandb=false", f"--data.tokenizer={data / 'tok.model'}"]
    config = tmp_path / "rounds.toml"
    config.write_text(f"""
[rounds]
count = 2
dir = "{tmp_path / 'rounds'}"
init_checkpoint = "{data / 'init'}"
reward_model = "{tmp_path / 'rm'}"
prompts = ["{data / 'prefs.jsonl'}"]
max_prompts = 24
k = 2
max_new_tokens = 8
winrate_prompts = 4
sft_preset = "{REPO_ROOT / 'configs/rlhf/sft_hh_tiny.toml'}"
dpo_preset = "{REPO_ROOT / 'configs/rlhf/dpo_tiny.toml'}"
sft_overrides = {toml_list([*small, "--sft.epochs=1", "--sft.valid_fraction=0", "--train.steps=2"])}
dpo_overrides = {toml_list([*small, f"--dpo.files={data / 'prefs.jsonl'}", "--dpo.max_records_per_file=40",
                            "--train.steps=2"])}
dpo_variants = ["--dpo.beta=0.1", "--dpo.beta=0.5 --train.seed=3"]
""")
    monkeypatch.setenv("LLAMA_TRAIN_ENGINE", "train.reference:ReferenceEngine")
    monkeypatch.setenv("LLAMA_TRAIN_TOPOLOGY", "train.reference:single_process_topology")
    monkeypatch.setenv("PYTHONPATH", f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    from rlhf.rounds import DONE, main

    assert main(["--config", str(config)]) == 0
    root = tmp_path / "rounds"
    for n in (1, 2):
        for step in ("rs", "sft", "dpo_0", "dpo_1", "final"):
            assert (root / f"round_{n}" / step / DONE).is_file(), (n, step)
        summary = json.loads((root / f"round_{n}" / "summary.json").read_text())
        assert 0.0 <= summary["dpo_accuracy"] <= 1.0 and 0.0 <= summary["win_rate_vs_previous"] <= 1.0
        assert isinstance(summary["best_of_k_gain"], float) and summary["best_of_k_gain"] >= 0.0
    sft2 = (root / "round_2" / "sft" / "config.toml").read_text()
    assert str(root / "round_1" / "final") in sft2, "round 2 starts from round 1's averaged model"
    assert json.loads((root / "round_2" / "final" / "rlhf.json").read_text())["averaged_from"]["weights"] == [0.5, 0.5]
    rs2 = json.loads((root / "round_2" / "rs" / "report.json").read_text())
    assert rs2["previous_rounds"] == [str(root / "round_1" / "rs")]
    table = (root / "summary.md").read_text()
    assert table.count("\n| ") == 2 and "| 2 |" in table

    # A rerun finds every step finished: nothing is executed again (the marker files are untouched).
    from rlhf.rounds import Rounds, RoundsConfig

    stamps = {p: p.stat().st_mtime_ns for p in root.rglob(DONE)}
    Rounds(RoundsConfig.from_toml(config).validate(), log=lambda *a: None).run()
    assert {p: p.stat().st_mtime_ns for p in root.rglob(DONE)} == stamps
    # Round 2 interrupted before its averaging: only that step runs again.
    import shutil

    shutil.rmtree(root / "round_2" / "final")
    (root / "round_2" / "summary.json").unlink()
    logged: list[str] = []
    Rounds(RoundsConfig.from_toml(config).validate(), log=logged.append).run()
    ran = [line.split(":")[0] for line in logged if line.startswith("[rounds] round") and "finished earlier" not in line]
    assert ran == ["[rounds] round 2 average"], logged
    assert (root / "round_2" / "final" / DONE).is_file() and (root / "round_2" / "summary.json").is_file()
