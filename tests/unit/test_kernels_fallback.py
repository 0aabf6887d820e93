"""The fused CPU kernels' fallbacks run everywhere, also where the kernels build: each one is forced (no compiler:
``CC=false`` with an empty kernel cache; switched off: ``LLAMA_CPU_KERNELS=0``) in a fresh process, and the model
there must give exactly the logits of the eager formulas (``kernels.disabled()`` here), i.e. the fallback IS the
eager path, not merely something that runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model import kernels
from model.config import get_config
from model.llama import Llama, init_llama_weights

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]

FORWARD = """
    import logging, sys, torch
    logging.basicConfig()
    from model import kernels
    from model.kernels import build
    from model.config import get_config
    from model.llama import Llama, init_llama_weights
    model = Llama(get_config("debug_tiny"))
    init_llama_weights(model, seed=3)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    documents = torch.cumsum((torch.arange(40) % 13 == 12).long(), 0).expand(2, 40)
    with torch.no_grad():
        logits = model(tokens, document_ids=documents)
    torch.save(logits, sys.argv[1])
    print("ENABLED", kernels.enabled(), "ERROR", build.last_error)
"""


def _eager_logits() -> torch.Tensor:
    model = Llama(get_config("debug_tiny"))
    init_llama_weights(model, seed=3)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    documents = torch.cumsum((torch.arange(40) % 13 == 12).long(), 0).expand(2, 40)
    with torch.no_grad(), kernels.disabled():
        return model(tokens, document_ids=documents)


def _forced(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, torch.Tensor]:
    out = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(FORWARD), str(out)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, torch.load(out, weights_only=True)


def test_no_compiler_falls_back_to_the_eager_formulas(tmp_path: Path) -> None:
    done, logits = _forced({"CC": "false", "LLAMA_KERNEL_CACHE": str(tmp_path / "cache")}, tmp_path)
    assert "ENABLED False" in done.stdout and "false -O3" in done.stdout  # the compiler's failure is the reason
    assert done.stderr.count("eager PyTorch formulas") == 1  # said once, as a warning
    assert torch.equal(logits, _eager_logits())


def test_switched_off_runs_the_eager_formulas_silently(tmp_path: Path) -> None:
    done, logits = _forced({"LLAMA_CPU_KERNELS": "0", "LLAMA_KERNEL_CACHE": str(tmp_path / "cache")}, tmp_path)
    assert "ENABLED False ERROR LLAMA_CPU_KERNELS=0" in done.stdout and "WARNING" not in done.stderr
    assert not (tmp_path / "cache").exists()  # nothing was compiled
    assert torch.equal(logits, _eager_logits())
