"""The run config every distributed parity check shares (and its single-process reference runs)."""

from __future__ import annotations

from train.config import RunConfig

BASE = [
    "--model.name=debug_tiny", "--data.synthetic=true", "--data.seq_len=64",
    "--train.steps=5", "--train.global_batch_size=8", "--train.micro_batch_size=2", "--train.seed=7",
    "--train.eval_every=0", "--train.log_every=100",
    "--optim.lr=3e-3", "--optim.warmup_steps=2", "--optim.min_lr_ratio=0.1",
    # A clip below the initial gradient norm (~0.6), so every step exercises the TP/PP-aware norm.
    "--optim.grad_clip=0.3",
    "--checkpoint.every=0", "--checkpoint.keep_last=5", "--logging.wandb=false",
]


EAGER = "@eager"
"""A pseudo-override of the parity launches: run this layout on the eager formulas (``kernels.disabled()``)."""


def parity_config(overrides: list[str]) -> RunConfig:
    return RunConfig.from_toml(None, BASE + list(overrides))
