"""Per-iteration PPO metrics: ``RUN_DIR/metrics.jsonl`` (``"type": "ppo"`` records), a console line, wandb.

    log = PPOMetricsLogger(run_dir, config=cfg_dict, wandb=False, enabled=rank == 0)
    log.log({"step": 3, "reward/combined": 0.61, "kl": 0.8, ...}); log.event("early stop"); log.close()

Keys (every iteration): ``reward/helpful``, ``reward/safety``, ``reward/combined`` (the three as probabilities),
``reward/logit_combined`` (LOGIT(Rc), before whitening), ``reward/used_safety`` (share of answers scored by the
safety RM), ``reward/safety_on_safety_prompts``, ``kl`` (k1, nats per sequence), ``kl_k3`` (per token),
``entropy``, ``clip_fraction``, ``approx_kl``, ``policy_loss``, ``value_loss``, ``policy_grad_norm``,
``value_grad_norm``, ``response_length``, ``truncated``, ``gen_time_s``, ``score_time_s``, ``train_time_s``,
``rollout_tokens_per_s``; on evaluation iterations the same reward keys under ``heldout/``.
``python -m train.report RUN_DIR`` plots them (``ppo.png`` and ``all_metrics.png``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from train.metrics import truncate_jsonl, wandb_mode


class PPOMetricsLogger:
    """JSONL + console + optional wandb; a no-op unless ``enabled`` (global rank 0)."""

    def __init__(self, run_dir: str | Path, *, config: dict[str, Any], enabled: bool = True, wandb: bool = False,
                 wandb_project: str = "llama-stack", wandb_mode_setting: str = "", start_step: int = 0,
                 print_fn: Any = print) -> None:
        self.enabled, self.print = enabled, print_fn
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run: Any = None
        self._t0 = time.perf_counter()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, after_step=start_step)
        self._fh = open(self.path, "a")
        mode = wandb_mode(wandb_mode_setting)
        if wandb and mode != "disabled":
            import wandb as wb

            self.wandb_run = wb.init(project=wandb_project, dir=str(run_dir), config=config, mode=mode,
                                     name=Path(run_dir).name, settings=wb.Settings(console="off", silent=True))

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        rec = {"type": "ppo", **record, "elapsed_s": time.perf_counter() - self._t0}
        if not self.enabled:
            return rec
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        self.print(console_line(rec), flush=True)
        if self.wandb_run is not None:
            numeric = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.wandb_run.log({k: v for k, v in numeric.items() if k != "step"}, step=rec["step"])
        return rec

    def event(self, message: str) -> None:
        if self.enabled:
            self.print(message, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()


def console_line(rec: dict[str, Any]) -> str:
    parts = [f"iter {rec['step']}"]
    for key, label, fmt in (("reward/combined", "Rc", ".3f"), ("reward/logit_combined", "logit Rc", ".3f"),
                            ("heldout/reward/logit_combined", "held-out", ".3f"), ("kl", "KL", ".3f"),
                            ("entropy", "H", ".2f"), ("clip_fraction", "clip", ".2f"),
                            ("value_loss", "vloss", ".4f"), ("response_length", "len", ".1f"),
                            ("gen_time_s", "gen s", ".2f"), ("train_time_s", "train s", ".2f")):
        if isinstance(rec.get(key), (int, float)):
            parts.append(f"{label} {rec[key]:{fmt}}")
    if rec.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)
