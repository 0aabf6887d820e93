"""``python -m rlhf.average``: weighted means tensor by tensor, streamed, mismatched models refused by field name
(run: ``pytest tests/unit/test_average.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoints import load_checkpoint, open_checkpoint, save_checkpoint
from model.config import get_config
from model.llama import Llama, init_llama_weights
from rlhf.average import AveragedWeights, average_checkpoints, main

pytestmark = pytest.mark.timeout(120)


def saved(path: Path, seed: int, **overrides: object) -> Path:
    cfg = get_config("debug_tiny").replace(**overrides) if overrides else get_config("debug_tiny")
    model = Llama(cfg)
    init_llama_weights(model, seed=seed)
    save_checkpoint(model, cfg, path, overwrite=True)
    return path


def test_weighted_mean_of_three(tmp_path: Path) -> None:
    paths = [saved(tmp_path / f"m{i}", seed=i) for i in range(3)]
    (paths[0] / "rlhf.json").write_text(json.dumps({"stage": "dpo", "template": "llama3_1"}))
    out = average_checkpoints(paths, tmp_path / "avg", weights=[2.0, 1.0, 1.0])
    _, avg = load_checkpoint(out)
    states = [load_checkpoint(p)[1] for p in paths]
    for name, tensor in avg.items():
        expected = 0.5 * states[0][name] + 0.25 * states[1][name] + 0.25 * states[2][name]
        assert torch.allclose(tensor, expected, atol=1e-7, rtol=0), name
    meta = json.loads((out / "rlhf.json").read_text())
    assert meta["template"] == "llama3_1" and meta["averaged_from"]["weights"] == [0.5, 0.25, 0.25]


def test_reads_one_tensor_of_each_checkpoint_at_a_time(tmp_path: Path) -> None:
    """The output is produced name by name: reader i's tensor k is read right before reader j's tensor k."""
    log: list[tuple[int, str]] = []

    class Logged:
        def __init__(self, reader: object, i: int) -> None:
            self.reader, self.i, self.cfg = reader, i, reader.cfg

        def __getattr__(self, attr: str) -> object:
            return getattr(self.reader, attr)

        def read(self, name: str) -> torch.Tensor:
            log.append((self.i, name))
            return self.reader.read(name)

    readers = [Logged(open_checkpoint(saved(tmp_path / f"m{i}", seed=i)), i) for i in range(2)]
    source = AveragedWeights(readers, [1.0, 1.0])
    for name in source.names():
        source.read(name)
    assert log == [(i, name) for name in source.names() for i in range(2)]


def test_mismatched_configs_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = saved(tmp_path / "a", seed=0)
    b = saved(tmp_path / "b", seed=1, norm_eps=1e-6)
    code = main(["--checkpoint", str(a), "--checkpoint", str(b), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "norm_eps: 1e-05 vs 1e-06" in err and str(b) in err
    assert not (tmp_path / "out").exists()
    code = main(["--checkpoint", str(a), "--checkpoint", str(a), "--weights", "1", "--output", str(tmp_path / "o")])
    assert code == 2 and "2 checkpoints" in capsys.readouterr().err


def test_cli_writes_bf16(tmp_path: Path) -> None:
    a, b = saved(tmp_path / "a", seed=0), saved(tmp_path / "b", seed=1)
    assert main(["--checkpoint", str(a), "--checkpoint", str(b), "--output", str(tmp_path / "o"),
                 "--dtype", "bf16"]) == 0
    reader = open_checkpoint(tmp_path / "o")
    assert {s.dtype for s in reader.specs()} == {torch.bfloat16}
