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
    # The Llama 3 variant (formatting tokens masked, NLL 0.2) with a large beta so the loss moves in 3 steps.
    "dpo": ["--optim.grad_clip=0.5", "--dpo.max_records_per_file=64", "--dpo.beta=0.5", "--dpo.nll_weight=0.2",
            "--dpo.mask_formatting_tokens=true"],
}
FILES = {"sft": "sft.files", "rm": "rm.helpful_files", "dpo": "dpo.files"}


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
    from rlhf.dpo.config import DPOConfig
    from rlhf.reward.config import RewardConfig
    from rlhf.sft.config import SFTConfig

    args = [*COMMON, *STAGE[stage], f"--{FILES[stage]}={data / 'prefs.jsonl'}", f"--data.tokenizer={data / 'tok.model'}",
            f"--{stage}.init_checkpoint={data / 'init'}", *overrides]
    return {"sft": SFTConfig, "rm": RewardConfig, "dpo": DPOConfig}[stage].from_toml(None, args)


def run_stage_config(stage: str, cfg: Any, **loop_kwargs: Any) -> Any:
    from rlhf.dpo.train import run_dpo
    from rlhf.reward.train import run_reward
    from rlhf.sft.train import run_sft

    run = {"sft": run_sft, "rm": run_reward, "dpo": run_dpo}[stage]
    result, _ = run(cfg, print_fn=lambda *a, **k: None, **loop_kwargs)
    return result
