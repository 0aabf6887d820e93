"""Build portable training checkpoints from full weights without a launcher (tests and benchmarks).

    from tests.checkpoint_helpers import write_portable_checkpoint
    step_dir = write_portable_checkpoint(run_dir, state_dict, cfg, tp=2, dp=3, step=7)

Lays the weights out exactly as the engine's ranks save them: every TP rank holds ``chunk(tp, dim)`` of a
split tensor (column-parallel along dim 0, row-parallel along dim 1, norms whole), and every DP rank an even
ZeRO-3-style flat fragment of it; the Adam moments are ``2 x`` and ``3 x`` the weights so a mix-up shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from model.config import LlamaConfig
from train.portable import Fragment, write_rank_fragments

ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def tp_dim_of(name: str) -> int | None:
    """Where Megatron's layers split our parameter ``name`` (None: replicated)."""
    if name.endswith("norm.weight"):
        return None
    return 1 if name.endswith(ROW_PARALLEL) else 0


def write_portable_checkpoint(run_dir: Path, state_dict: dict[str, Tensor], cfg: LlamaConfig, *, tp: int,
                              dp: int, step: int = 1) -> Path:
    """A published ``step_N`` directory holding only portable files (+ meta.json, COMPLETE)."""
    step_dir = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    layout = {"tp": tp, "pp": 1, "dp": dp, "zero_stage": 3, "offload": False, "dtype": "fp32",
              "model": cfg.to_dict()}
    for tp_rank in range(tp):
        for dp_rank in range(dp):
            fragments = []
            for name, full in state_dict.items():
                if cfg.tie_embeddings and name == "output.weight":
                    continue
                dim = tp_dim_of(name)
                piece = full if dim is None else full.chunk(tp, dim)[tp_rank]
                flat = piece.reshape(-1).float()
                step_size = -(-flat.numel() // dp)
                start, stop = min(dp_rank * step_size, flat.numel()), min((dp_rank + 1) * step_size, flat.numel())
                part = flat[start:stop].clone()
                fragments.append(Fragment(name, part, part * 2, part * 3, dim, tuple(piece.shape),
                                          tuple(full.shape), start))
            write_rank_fragments(step_dir, fragments, tp_rank=tp_rank, pp_rank=0, dp_rank=dp_rank, adam_step=step,
                                 layout=layout)
            del fragments
    (step_dir / "meta.json").write_text(json.dumps({"step": step}) + "\n")
    (step_dir / "COMPLETE").write_text("ok\n")
    return step_dir


def random_state_dict(cfg: LlamaConfig, *, seed: int = 0) -> dict[str, Tensor]:
    """Every tensor of ``Llama(cfg)`` random (norms too), without building the module."""
    from model.checkpoints.native import expected_shapes

    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.05 + (1.0 if name.endswith("norm.weight") else 0.0)
            for name, shape in expected_shapes(cfg).items()}
