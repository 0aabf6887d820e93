"""The alignment stages' policy export: a native checkpoint (``train.task.export_final``: streamed, tied head
stored once) plus ``rlhf.json``, what the next stage needs besides the weights (the shape is the checkpoint's
``config.json``).

    export_policy(engine, model_cfg, out_dir, rank=r, meta=policy_meta(stage="ppo", tokenizer=..., template=...))
    meta = read_sidecar("runs/llama2/ppo/final_policy")   # {} when there is none

``rlhf.json``: ``stage``, ``tokenizer`` (absolute path of the tokenizer.model), ``template`` (chat format),
``max_len`` and what the stage adds (SFT: its split). SFT, GAtt, PPO (``final_policy``, ``best_policy``) and DPO
write it; rejection sampling, PPO and ``gatt build`` read their tokenizer and template from it (a run directory
means its export: ``rlhf.paths.checkpoint_dir``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.paths import checkpoint_dir, resolve_path
from train.config_reader import ConfigError

SIDECAR = "rlhf.json"


def policy_meta(*, stage: str, tokenizer: str, template: str, max_len: int, **extra: Any) -> dict[str, Any]:
    """The ``rlhf.json`` content (the tokenizer path made absolute, so the export can move away from the cwd)."""
    tok = str(resolve_path(tokenizer).resolve()) if tokenizer else ""
    return {"stage": stage, "tokenizer": tok, "template": template, "max_len": int(max_len), **extra}


def export_policy(engine: Any, model_cfg: Any, out_dir: str | Path, *, rank: int, meta: dict[str, Any]) -> Path:
    """Collective (every rank calls it): the native checkpoint + ``rlhf.json`` in ``out_dir``."""
    from train.task import export_final

    export_final(engine, model_cfg, Path(out_dir), rank=rank, sidecars={SIDECAR: meta})
    return Path(out_dir)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The ``rlhf.json`` of a policy export (or of the run directory's ``final_model``); {} when absent."""
    p = checkpoint_dir(path) / SIDECAR
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not JSON ({e}); delete it or re-export the model") from e
