"""The SFT and reward-model run configs the alignment parity checks share (and their single-process references).

Data made by ``make_parity_data`` (no shared data needed): the synthetic preference set and its SentencePiece
model (``rlhf.synthetic``) and a seeded ``debug_tiny`` native checkpoint to start from, so the initial weights
are cut into TP slices by the engine's ``init_weights`` path as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMMON = [
    "--model.name=debug_tiny", "--data.seq_len=96", "--train.steps=3", "--train.global_batch_size=8",
    "--train.micro_batch_size=2", "--train.seed=7", "--train.eval_every=0", "--train.log_every=100",
    "--optim.lr=1e-3", "--optim.warmup_steps=1", "--optim.min_lr_ratio=0.1", "--checkpoint.every=0",
    "--logging.wandb=false",
]
# Clips below the initial gradient norms, so every step exercises the TP-aware norm (checked by the test).
STAGE = {
    "sft": ["--optim.grad_clip=0.5", "--sft.max_records_per_file=200"],
    "rm": ["--optim.grad_clip=0.1", "--rm.max_records_per_file=200", "--rm.mixture=all", "--rm.margin=large",
           "--rm.warmup_fraction=0"],
}


def make_parity_data(root: Path) -> Path:
    """Tokenizer, graded preferences and an initial checkpoint under ``root``; returns ``root``."""
    from model.checkpoints import save_checkpoint
    from model.config import get_config
    from model.llama import Llama, init_llama_weights
    from rlhf.synthetic import synthetic_tokenizer, write_synthetic_preferences

    root.mkdir(parents=True, exist_ok=True)
    synthetic_tokenizer(root / "tok")
    write_synthetic_preferences(root / "prefs.jsonl", n=400, seed=3, graded=True)
    cfg = get_config("debug_tiny")
    model = Llama(cfg)
    init_llama_weights(model, seed=99)
    save_checkpoint(model, cfg, root / "init", overwrite=True)
    return root


def rlhf_parity_config(stage: str, data: Path, overrides: list[str]) -> Any:
    from rlhf.reward.config import RewardConfig
    from rlhf.sft.config import SFTConfig

    files = [f"--sft.files={data / 'prefs.jsonl'}"] if stage == "sft" else [f"--rm.helpful_files={data / 'prefs.jsonl'}"]
    args = [*COMMON, *STAGE[stage], *files, f"--data.tokenizer={data / 'tok.model'}",
            f"--{stage}.init_checkpoint={data / 'init'}", *overrides]
    return (SFTConfig if stage == "sft" else RewardConfig).from_toml(None, args)


def run_stage_config(stage: str, cfg: Any, **loop_kwargs: Any) -> Any:
    from rlhf.reward.train import run_reward
    from rlhf.sft.train import run_sft

    result, _ = (run_sft if stage == "sft" else run_reward)(cfg, print_fn=lambda *a, **k: None, **loop_kwargs)
    return result
