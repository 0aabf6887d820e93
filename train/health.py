"""Training health: skipped non-finite steps, abort after K in a row, loss-spike detection, hang diagnostics.

    from train.health import HealthMonitor
    health = HealthMonitor(max_consecutive_nonfinite=5, spike_factor=3.0)
    event = health.observe(step, loss=result.loss, grad_norm=result.grad_norm, skipped=result.skipped)
    # raises NonFiniteAbort (with what to try) after K non-finite steps in a row; event is "ok"|"skipped"|"spike"

The engine skips the optimizer step itself when the loss or the gradient norm is NaN/Inf (``StepResult.skipped``);
here those steps are counted. A spike is a finite loss above ``spike_factor`` x the running mean of the last
finite losses (an exponential moving average after 10 steps of warm-up); spikes are logged, not acted on.
``describe_collective_timeout`` turns a distributed timeout into a message naming the rank and the op;
``guard_collectives`` applies it to a call that contains collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ABORT_ADVICE = (
    "what to try: lower optim.lr (or lengthen optim.warmup_steps); keep optim.grad_clip at 1.0; with bf16 try "
    "--train.dtype=fp32 to rule out overflow; resume from the previous checkpoint with --resume auto (the data "
    "position continues past the bad batch only if you also skip it); inspect the data around consumed_samples"
)


class NonFiniteAbort(RuntimeError):
    """Raised after ``max_consecutive_nonfinite`` non-finite steps in a row."""


@dataclass
class HealthMonitor:
    max_consecutive_nonfinite: int = 5
    spike_factor: float = 3.0
    ema_decay: float = 0.9
    skipped_total: int = 0
    consecutive: int = 0
    spikes: int = 0
    _ema: float | None = None
    _seen: int = 0
    events: list[dict] = field(default_factory=list)

    def observe(self, step: int, *, loss: float, grad_norm: float, skipped: bool) -> str:
        """Record one step's outcome; returns "ok", "skipped" or "spike"."""
        nonfinite = skipped or not math.isfinite(loss) or not math.isfinite(grad_norm)
        if nonfinite:
            self.skipped_total += 1
            self.consecutive += 1
            self.events.append({"step": step, "event": "nonfinite", "loss": loss, "grad_norm": grad_norm})
            if self.consecutive >= self.max_consecutive_nonfinite:
                raise NonFiniteAbort(
                    f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or gradient norm "
                    f"(loss={loss}, grad_norm={grad_norm}; {self.skipped_total} skipped in total); aborting. "
                    + ABORT_ADVICE
                )
            return "skipped"
        self.consecutive = 0
        event = "ok"
        if self._ema is not None and self._seen >= 10 and loss > self.spike_factor * self._ema:
            self.spikes += 1
            self.events.append({"step": step, "event": "spike", "loss": loss, "running_mean": self._ema})
            event = "spike"
        self._ema = loss if self._ema is None else self.ema_decay * self._ema + (1 - self.ema_decay) * loss
        self._seen += 1
        return event

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive, "spikes": self.spikes,
                "ema": self._ema, "seen": self._seen}

    def load_state_dict(self, d: dict) -> None:
        self.skipped_total, self.consecutive = int(d["skipped_total"]), int(d["consecutive"])
        self.spikes, self._ema, self._seen = int(d["spikes"]), d["ema"], int(d["seen"])


def describe_collective_timeout(err: BaseException, *, rank: int, op: str, timeout_s: float) -> str:
    """A message for a collective that did not finish: which rank, which op, and what to check."""
    return (
        f"rank {rank}: collective '{op}' did not complete within {timeout_s:.0f} s ({type(err).__name__}: {err}). "
        "Another rank probably died or is stuck (look for its traceback first), or the ranks disagree on the "
        "number of steps/micro-batches; raise train.collective_timeout_s only if the job is merely slow"
    )


def guard_collectives(op: str, fn: Callable[[], Any], *, rank: int, timeout_s: float) -> Any:
    """``fn()``, a step that contains collectives; a timeout becomes a message naming the rank and the op."""
    try:
        return fn()
    except RuntimeError as err:
        text = str(err).lower()
        if "timed out" in text or "timeout" in text or "deadline" in text:
            raise RuntimeError(describe_collective_timeout(err, rank=rank, op=op, timeout_s=timeout_s)) from err
        raise
