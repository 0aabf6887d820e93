"""The long-context recipe (issue 22 item 4): six Llama 3.1 8B stages from 16K to 128K tokens with context
parallelism, each a config the engine accepts and the planner says fits; and a resume at another
``data.seq_len`` that continues after the tokens already consumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.planner import GiB, Hardware, Layout, evaluate
from tests.conftest import REPO_ROOT
from tests.unit.test_train_loop import _cfg, _no_peak_measurement, _records, _run  # noqa: F401 (fixture)
from train.config import RunConfig

pytestmark = pytest.mark.timeout(120)
STAGES = sorted((REPO_ROOT / "configs" / "long_context").glob("llama3_1_8b_stage*.toml"))
GPUS = 64


def test_six_stages_from_16k_to_128k_fit_and_run_here() -> None:
    assert [p.name for p in STAGES] == [f"llama3_1_8b_stage{i}.toml" for i in range(1, 7)]
    configs = [RunConfig.from_toml(p) for p in STAGES]
    lengths = [c.data.seq_len for c in configs]
    assert lengths[0] == 16384 and lengths[-1] == 131072 and lengths == sorted(set(lengths))
    steps = [c.train.steps for c in configs]
    assert steps == sorted(set(steps)) and steps[0] > 3576279  # cumulative, after the 8K run
    for path, cfg in zip(STAGES, configs):
        cfg.validate(world_size=GPUS)
        assert cfg.run.resume == "auto" and cfg.run.dir == "runs/llama3_1_8b" and cfg.model.name == "llama3_1_8b"
        assert cfg.optim.min_lr_ratio == 1.0 and cfg.optim.lr == 3e-5  # the 8K run's final LR, constant
        p = cfg.parallel
        layout = Layout(tp=p.tp, cp=p.cp, pp=p.pp, dp=GPUS // (p.tp * p.cp * p.pp), zero_stage=cfg.zero.stage,
                        micro_batch=cfg.train.micro_batch_size,
                        activation_checkpointing=p.activation_checkpoint_every > 0)
        plan = evaluate(cfg.model_config(), layout, seq_len=cfg.data.seq_len,
                        global_batch_tokens=cfg.train.global_batch_size * cfg.data.seq_len,
                        hardware=Hardware(memory_bytes=80 * GiB))
        assert plan.fits and plan.runnable, (path.name, plan.memory.total / GiB, plan.refusals)
    assert configs[-1].parallel.cp > 1 and configs[-1].model_config().rope_scaling is not None


def test_resume_at_a_longer_seq_len_continues_after_the_consumed_tokens(tmp_path: Path) -> None:
    first = _run(_cfg(tmp_path, "--train.steps=4", "--data.seq_len=32"))
    assert first.last_step == 4
    before = _records(tmp_path)[-1]["consumed_samples"]
    second = _run(_cfg(tmp_path, "--train.steps=6", "--data.seq_len=64", "--run.resume=auto"))
    assert second.start_step == 4 and second.reason == "completed"
    after = _records(tmp_path)
    batch = RunConfig.from_toml(tmp_path / "config.toml").train.global_batch_size
    assert after[4]["step"] == 5 and after[4]["consumed_samples"] == before * 32 // 64 + batch
