"""The Llama learning-rate schedule: linear warmup, then cosine decay to a floor.

    from train.schedule import lr_at
    lr = lr_at(step, peak=3e-4, warmup=2000, total=250_000, min_lr=3e-5)

``step`` counts optimizer steps from 0. Warmup is linear from ``peak / warmup`` at step 0 to ``peak`` at step
``warmup - 1`` (so the first update is not wasted at LR 0); cosine from ``peak`` at ``warmup`` to ``min_lr``
at ``total - 1`` (Llama 1/2: min_lr = 10% of peak; Llama 3 405B: 8e-7). Steps past ``total`` stay at min_lr.
"""

from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total - 1 - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / decay_steps))
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_from_config(cfg: Any) -> Any:
    """``f(step) -> lr`` from a ``RunConfig`` (``optim.min_lr`` >= 0 overrides ``min_lr_ratio``)."""
    o = cfg.optim
    min_lr = o.min_lr if o.min_lr >= 0 else o.lr * o.min_lr_ratio
    warmup = min(o.warmup_steps, cfg.train.steps)

    def schedule(step: int) -> float:
        return lr_at(step, peak=o.lr, warmup=warmup, total=cfg.train.steps, min_lr=min_lr)

    return schedule
