"""The benchmarks refuse to time models that do not compute the same thing.

``bench_model.check_same_outputs`` (logits, loss, every gradient vs ``transformers``, before timing) and
``bench_train.check_losses_agree`` (every step's loss vs the plain loop, not only the first)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(120)


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_bench_model_checks_logits_loss_and_gradients_before_timing() -> None:
    pytest.importorskip("transformers")
    bench = _bench("bench_model")
    ours, hf = bench.build_pair("debug_tiny", seed=0)
    tokens = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=-100).flatten()
    gaps = bench.check_same_outputs(ours, hf, tokens, labels)
    assert set(gaps) == {"logits", "loss", "gradients_max"} and max(gaps.values()) < 1e-5
    with torch.no_grad():  # a wrong weight in one layer: outputs and gradients no longer agree
        hf.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(SystemExit, match="disagree before timing"):
        bench.check_same_outputs(ours, hf, tokens, labels)


def test_bench_train_compares_every_step_not_only_the_first() -> None:
    bench = _bench("bench_train")
    same = {"plain": [8.3, 8.2, 8.1, 8.0], "ours": [8.3, 8.2 + 1e-6, 8.1, 8.0], "hf": [8.3, 8.2, 8.1, 8.0 - 2e-6]}
    gaps = bench.check_losses_agree(same)
    assert gaps["plain"] == 0 and gaps["ours"] == pytest.approx(1e-6, abs=1e-9)
    drifted = {**same, "ours": [8.3, 8.2, 8.1, 7.99]}  # equal first loss (before any update), then drifts
    with pytest.raises(SystemExit, match="ours"):
        bench.check_losses_agree(drifted)
    with pytest.raises(SystemExit, match="nan|ours"):
        bench.check_losses_agree({**same, "ours": [8.3, float("nan"), 8.1, 8.0]})
    with pytest.raises(SystemExit, match="ran 3 steps"):
        bench.check_losses_agree({**same, "ours": [8.3, 8.2, 8.1]})
