"""The reward model (Llama 2 sec. 3.2.2): a Llama backbone with its LM head removed and a scalar head, its engine
objective (the margin ranking loss), and its export format.

    module = RewardModel(Llama(cfg))                 # reward_head: Linear(dim, 1), reads the answer's last token
    scores = module.scores(input_ids, score_index)   # [B] fp32
    save_reward_model(state_dict, cfg, "runs/rm/final_model", meta={...})
    model, meta = load_reward_model("runs/rm")       # a run directory means its final_model/

The head reads the final-norm hidden state at the answer's last token (its end-of-turn token, which has attended
to the whole answer). Under tensor parallelism the hidden state is whole on every TP rank, so the head is an
ordinary replicated ``nn.Linear`` and its gradient is the same on all of them. Export: ``reward_model.safetensors``
(native names + ``reward_head.weight``) and ``reward_model.json`` (model config, tokenizer, template, split, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from model.config import LlamaConfig
from model.llama import Llama
from rlhf.losses import ranking_loss
from rlhf.paths import checkpoint_dir
from train.config_reader import ConfigError

HEAD = "reward_head.weight"
FORMAT = "llama-reward-model"
WEIGHTS, META = "reward_model.safetensors", "reward_model.json"


class RewardModel(nn.Module):
    """Llama backbone without its LM head + ``reward_head``; ``forward`` gives scores or the scaled loss sum."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        model.output = None  # the LM head is not part of a reward model (and would get no gradient)
        self.model = model
        self.reward_head = nn.Linear(model.config.dim, 1, bias=False)

    def scores(self, input_ids: Tensor, score_index: Tensor) -> Tensor:
        """One scalar per row, read at ``score_index`` (fp32)."""
        hidden = self.model(input_ids, return_hidden=True)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), score_index]
        return self.reward_head(picked).squeeze(-1).float()

    def forward(self, input_ids: Tensor, score_index: Tensor, margin: Tensor | None = None,
                pair_weight: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """Rows ``0..B-1`` chosen, ``B..2B-1`` rejected (``rlhf.batching.collate_pairs``). Without ``scale``:
        the ``[2B]`` scores; with it: ``sum_i w_i * -log sigmoid(r_c - r_r - m) * scale``."""
        r = self.scores(input_ids, score_index)
        if scale is None:
            return r
        b = r.shape[0] // 2
        losses = ranking_loss(r[:b], r[b:], margin, reduction="none")
        weight = pair_weight.to(losses) if pair_weight is not None else torch.ones_like(losses)
        return (losses * weight).sum() * scale


class RewardObjective:
    """The engine objective of reward-model training (see ``train.objective.LanguageModelObjective``)."""

    input_keys: tuple[str, ...] = ("input_ids", "score_index", "margin", "pair_weight")
    weight_key: str = "pair_weight"
    supports_pipeline: bool = False  # the pipeline stages end in the LM head; TP and ZeRO 1-3 work

    def build_module(self, model_cfg: LlamaConfig, factory: Any, run_cfg: Any) -> nn.Module:
        model = Llama(model_cfg, layers=factory)
        model.checkpoint_every = run_cfg.parallel.activation_checkpoint_every
        return RewardModel(model)

    def native_name(self, name: str) -> str:
        return name.removeprefix("model.")


def save_reward_model(state_dict: dict[str, Tensor], model_cfg: LlamaConfig, out_dir: str | Path, *,
                      meta: dict[str, Any]) -> Path:
    """``reward_model.safetensors`` (native names + ``reward_head.weight``) and ``reward_model.json``."""
    from train.portable import StateDictExport

    return write_reward_model(StateDictExport(dict(state_dict)), model_cfg, out_dir, meta=meta)


def write_reward_model(weights: Any, model_cfg: LlamaConfig, out_dir: str | Path, *, meta: dict[str, Any]) -> Path:
    """``save_reward_model`` streamed from an export (``train.loop.exported_weights``): one tensor at a time."""
    from model.checkpoints.native import atomic_directory
    from model.checkpoints.streaming import write_safetensors

    names = weights.names()
    if HEAD not in names:
        raise ValueError(f"save_reward_model: the state dict has no {HEAD!r}; is this a reward model?")
    if model_cfg.tie_embeddings and "output.weight" in names:
        names = [n for n in names if n != "output.weight"]  # safetensors stores a tied tensor once
    with atomic_directory(out_dir, overwrite=True) as tmp:
        write_safetensors(tmp / WEIGHTS, weights.specs(names), lambda name: weights.full(name))
        (tmp / META).write_text(json.dumps({"format": FORMAT, "model": model_cfg.to_dict(), **meta}, indent=2) + "\n")
    return Path(out_dir)


def load_reward_model(path: str | Path) -> tuple[RewardModel, dict[str, Any]]:
    """``(RewardModel in eval mode, its reward_model.json)`` from an export (or the run dir holding it)."""
    p = checkpoint_dir(path)
    meta_path = p / META
    if not meta_path.is_file():
        raise ConfigError(f"{path}: no {META}; expected a reward model exported by `python -m rlhf.reward` "
                          "(RUN_DIR/final_model or the run directory)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = RewardModel(Llama(LlamaConfig.from_dict(meta["model"])))
    weights = load_file(str(p / WEIGHTS))
    state = {(k if k == HEAD else "model." + k): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("output.weight")]
    if missing or unexpected:
        raise ConfigError(f"{p / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}; the file does not match "
                          f"its {META}")
    return model.eval(), meta
