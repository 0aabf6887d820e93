"""Where alignment files are: the ``{data_dir}`` placeholder, comma-separated file lists, run dirs -> exports.

    from rlhf.paths import resolve_path, file_list, checkpoint_dir
    resolve_path("{data_dir}/preferences/hh-rlhf")   # $LLAMA_DATA_DIR/..., else ../shared/data/... beside the repo
    checkpoint_dir("runs/sft")                       # runs/sft/final_model when the run directory holds one
    checkpoint_dir("runs/ppo")                       # a PPO run: its best_policy (else final_policy)

No dependencies beyond the standard library: every stage (and its config) uses these.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """``$LLAMA_DATA_DIR`` or ``../shared/data`` next to the repository (the tests' convention)."""
    return Path(os.environ.get("LLAMA_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def resolve_path(path: str) -> Path:
    """Expand a leading ``{data_dir}`` placeholder; other paths are used as given."""
    return Path(path.replace("{data_dir}", str(data_dir()))) if "{data_dir}" in path else Path(path)


def file_list(value: str) -> list[Path]:
    """A comma-separated list of paths (``{data_dir}`` expanded), empty entries ignored."""
    return [resolve_path(p.strip()) for p in value.split(",") if p.strip()]


POLICY_EXPORTS = ("final_model", "best_policy", "final_policy")
"""What a run directory's policy is, first found: SFT / GAtt / DPO / pretraining export ``final_model``; PPO
exports ``best_policy`` (the iteration with the best held-out reward, its result) and ``final_policy``."""


def checkpoint_dir(path: str | Path) -> Path:
    """A run directory means its exported model (``POLICY_EXPORTS``, first found); an export (a directory with
    ``config.json``) or anything else is returned as given."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    return next((p / name for name in POLICY_EXPORTS if (p / name).is_dir()), p)
