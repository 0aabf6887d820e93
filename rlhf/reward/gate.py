"""The gate between reward-model training and its users (PPO, rejection sampling): a reward model whose held-out
accuracy is at or below chance, or below the length-only baseline, has learned nothing useful to optimise.

    check_reward_model("runs/rm_helpful", key="reward.helpful", allow_weak=False)   # ConfigError when weak

The figures are the ones ``python -m rlhf.reward`` wrote after training: ``RUN_DIR/heldout_eval.json`` (per
held-out test set: accuracy, length_baseline, pairs). Without that file the strength is unknown: a warning, not a
refusal (a reward model from elsewhere).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from train.config_reader import ConfigError

EVAL_FILE = "heldout_eval.json"


def heldout_figures(path: str | Path) -> tuple[Path | None, dict[str, Any]]:
    """(the heldout_eval.json found, its content) for a reward-model run dir or its final_model/."""
    p = Path(path)
    for where in (p, p.parent):
        if (where / EVAL_FILE).is_file():
            try:
                return where / EVAL_FILE, json.loads((where / EVAL_FILE).read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where / EVAL_FILE}: not JSON ({e})") from e
    return None, {}


def weak_sets(figures: dict[str, Any]) -> list[str]:
    """The test sets on which the model is at or below chance or below the length baseline, described."""
    weak = []
    for name, r in figures.items():
        acc, base = float(r.get("accuracy", float("nan"))), float(r.get("length_baseline", float("nan")))
        if not acc > 0.5 or acc < base:
            weak.append(f"{name}: accuracy {acc:.3f} on {r.get('pairs', '?')} held-out pairs vs chance 0.5 and "
                        f"length baseline {base:.3f}")
    return weak


def check_reward_model(path: str | Path, *, key: str, allow_weak: bool, flag: str) -> None:
    """Refuse a weak reward model (``ConfigError`` naming ``key``, the figures and ``flag``) unless ``allow_weak``."""
    found, figures = heldout_figures(path)
    if found is None:
        warnings.warn(f"{key}={str(path)!r}: no {EVAL_FILE} beside it, so its held-out accuracy is unknown", stacklevel=2)
        return
    weak = weak_sets(figures)
    if not weak:
        return
    message = (f"{key}={str(path)!r} is a weak reward model ({found}): " + "; ".join(weak)
               + f". Train it longer or on more data; or pass {flag} to use it anyway")
    if not allow_weak:
        raise ConfigError(message)
    warnings.warn(message, stacklevel=2)
