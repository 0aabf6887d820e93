"""The distillation preset and ``[distill]`` validation: the preset the docstrings and ``--help`` name loads and
round-trips; bad values are errors naming the field.

    python -m pytest -q tests/unit/test_distill_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.distill.config import DistillConfig
from rlhf.paths import resolve_path
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)
PRESET = REPO_ROOT / "configs" / "rlhf" / "distill_tiny.toml"


def test_preset_loads_and_round_trips(tmp_path: Path) -> None:
    cfg = DistillConfig.from_toml(PRESET)
    d = cfg.distill
    assert (d.loss, d.top_k, d.hard_label_weight, d.temperature) == ("forward_kl", 32, 0.5, 1.0)
    assert resolve_path(d.teacher).name == "stories260K.bin" and "{data_dir}" not in str(resolve_path(d.teacher))
    assert cfg.model_config().n_layers == 2 and cfg.vocab_k == 32
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert DistillConfig.from_toml(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize(("override", "message"), [
    ("--distill.top_k=-1", "distill.top_k=-1"),
    ("--distill.loss=kl", "distill.loss='kl'"),
    ("--distill.hard_label_weight=1.5", "distill.hard_label_weight=1.5"),
    ("--distill.teacher=/nonexistent/teacher", "distill.teacher='/nonexistent/teacher': no such file"),
])
def test_bad_values_name_the_field(override: str, message: str, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.bin"
    teacher.write_bytes(b"")
    cfg = DistillConfig.from_toml(None, ["--data.synthetic=true", "--train.steps=3", f"--distill.teacher={teacher}", override])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        cfg.validate(world_size=1)


def test_teacher_tp_must_divide_the_ranks(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.bin"
    teacher.write_bytes(b"")
    cfg = DistillConfig.from_toml(None, ["--data.synthetic=true", "--train.steps=3", f"--distill.teacher={teacher}",
                                         "--distill.teacher_tp=2"])
    with pytest.raises(ValueError, match="distill.teacher_tp=2 must divide the 3 ranks"):
        cfg.validate(world_size=3)
    cfg.validate(world_size=2)
