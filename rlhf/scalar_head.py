"""The one scalar-head model of the alignment stages, and its one export format: reward models and PPO value models.

    model = ScalarHeadModel(Llama(cfg))             # the backbone without its LM head + reward_head: Linear(dim, 1)
    values = model.values(input_ids)                # [b, t]: one scalar per position (the PPO value model)
    scores = model.scores(input_ids, score_index)   # [b]: one scalar per row, at its index (the reward model)
    write_scalar_model(export, cfg, "runs/rm/final_model", meta={"tokenizer": ..., "template": ...})  # streamed
    save_scalar_model(state_dict, cfg, out_dir, meta=...)   # the same from an in-memory state dict
    cfg, reader, meta = read_scalar_model("runs/rm")    # lazy reader; a run directory means its final_model/
    model, meta = load_scalar_model("runs/rm")          # the whole module in one process (scoring, tests), read
                                                        # one tensor at a time

A reward model (``rlhf.reward.model.RewardModel``: ranking loss) and the PPO value model
(``rlhf.ppo.roles.ValueModel``: clipped value loss) are this model with a loss on top. The head is one
parameter, ``reward_head.weight`` under every name scheme (module and native), so a value model starts from a
helpfulness reward model (Llama 2) and both export and load the same way. Under tensor parallelism the final
norm's output is whole on every TP rank, so the head is an ordinary replicated ``nn.Linear`` whose gradient is
the same on all of them.

The export: ``reward_model.safetensors`` (native names + ``reward_head.weight``; no LM head) and
``reward_model.json`` (``{"format": "llama-reward-model", "model": LlamaConfig, ...meta}``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.config import LlamaConfig
from model.llama import Llama
from model.materialize import build_unfilled
from rlhf.paths import checkpoint_dir
from train.config_reader import ConfigError

HEAD = "reward_head.weight"
"""The head's name, in the module and in the export."""
FORMAT = "llama-reward-model"
WEIGHTS, META = "reward_model.safetensors", "reward_model.json"


class ScalarHeadModel(nn.Module):
    """Llama backbone without its LM head + ``reward_head`` (``Linear(dim, 1)``, no bias), fp32 outputs."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        model.output = None  # the LM head is not part of a scalar-head model (and would get no gradient)
        self.model = model
        self.reward_head = nn.Linear(model.config.dim, 1, bias=False)

    def values(self, input_ids: Tensor) -> Tensor:
        """One scalar per position, ``[b, t]``."""
        hidden = self.model(input_ids, return_hidden=True)
        return self.reward_head(hidden).squeeze(-1).float()

    def scores(self, input_ids: Tensor, score_index: Tensor) -> Tensor:
        """One scalar per row, read at ``score_index``, ``[b]``."""
        hidden = self.model(input_ids, return_hidden=True)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), score_index]
        return self.reward_head(picked).squeeze(-1).float()


def native_name(name: str) -> str:
    """Module parameter name -> native name (the backbone's names; the head keeps its own)."""
    return name.removeprefix("model.")


def zero_head(weights: Any, *, dim: int) -> Any:
    """Policy weights as a value-model init: the LM head dropped, a zero scalar head added (V = 0 at start).
    A dict gives a dict; a lazy reader (``open_checkpoint``) gives a reader over it (nothing is loaded)."""
    if hasattr(weights, "read_slice"):
        from model.checkpoints.reader import OverlayReader

        return OverlayReader(weights, drop=("output.weight",), extra={HEAD: torch.zeros(1, dim)})
    out = {k: v for k, v in weights.items() if k != "output.weight"}
    out.setdefault(HEAD, torch.zeros(1, dim))
    return out


def write_scalar_model(weights: Any, model_cfg: LlamaConfig, out_dir: str | Path, *, meta: dict[str, Any]) -> Path:
    """The export (see the module docstring), streamed one tensor at a time from an export source
    (``train.task.exported_weights``: ``names``/``specs``/``full``) and written atomically; ``meta`` goes into
    ``reward_model.json``."""
    from model.checkpoints.native import atomic_directory
    from model.checkpoints.streaming import write_safetensors

    names = weights.names()
    if HEAD not in names:
        raise ValueError(f"write_scalar_model: the state dict has no {HEAD!r}; is this a reward / value model?")
    names = [n for n in names if n != "output.weight"]  # a scalar-head model has no LM head (tied or not)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        write_safetensors(tmp / WEIGHTS, weights.specs(names), lambda name: weights.full(name))
        (tmp / META).write_text(json.dumps({"format": FORMAT, "model": model_cfg.to_dict(), **meta}, indent=2) + "\n")
    return Path(out_dir)


def save_scalar_model(state_dict: dict[str, Tensor], model_cfg: LlamaConfig, out_dir: str | Path, *,
                      meta: dict[str, Any]) -> Path:
    """``write_scalar_model`` from an in-memory state dict (tests, small models)."""
    from train.portable import StateDictExport

    return write_scalar_model(StateDictExport(dict(state_dict)), model_cfg, out_dir, meta=meta)


def read_scalar_model(path: str | Path) -> tuple[LlamaConfig, Any, dict[str, Any]]:
    """``(backbone config, native weights incl. reward_head.weight, reward_model.json)`` of an export made by
    ``python -m rlhf.reward`` or a PPO ``final_value/``, or of the run directory holding it. The weights are a lazy
    reader (``names``/``read``/``read_slice``): an engine built from them reads only its TP slices."""
    from model.checkpoints.reader import SafetensorsFileReader

    p = checkpoint_dir(path)
    if not (p / META).is_file():
        what = "does not exist" if not Path(path).exists() else f"has no {META}"
        raise ConfigError(f"{path} {what}; expected a reward model exported by `python -m rlhf.reward` "
                          "(RUN_DIR/final_model or the run directory)")
    meta = json.loads((p / META).read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{p / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    weights = SafetensorsFileReader(p / WEIGHTS)
    if HEAD not in weights.names():
        raise ConfigError(f"{p / WEIGHTS}: no {HEAD!r}; the file does not match its {META}")
    return LlamaConfig.from_dict(meta["model"]), weights, meta


def load_scalar_model(path: str | Path, *, module_cls: type[ScalarHeadModel] = ScalarHeadModel,
                      **module_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``(module_cls in eval mode with the export's weights, reward_model.json)``: one process, whole model.

    Why a whole load is bounded here: this is the scorer of one-process tools (``RewardScorer``:
    ``rlhf.reward.evaluate``, rejection sampling, the win-rate judge), which run without a process group, so
    the process's shard is the whole model and it holds it once: each tensor is read from the file and copied
    into the module one at a time (peak: the module + one tensor; no state dict of the whole model beside it).
    A reward model too large for one host is scored sharded, by PPO's frozen engine
    (``rlhf.ppo.rewards.RewardModelScorer``: TP x ZeRO-3, each rank reading only its slices)."""
    cfg, reader, meta = read_scalar_model(path)
    model = build_unfilled(lambda: module_cls(Llama(cfg), **module_kwargs), device="cpu")  # every tensor read below
    own = dict(model.named_parameters())
    names = set(reader.names())
    expected = {k if k == HEAD else "model." + k for k in names}
    missing = [k for k in own if k not in expected and not k.endswith("output.weight")]
    unexpected = [k for k in expected if k not in own]
    if missing or unexpected:
        raise ConfigError(f"{checkpoint_dir(path) / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                          f"the file does not match its {META}")
    with torch.no_grad():
        for name in names:
            param = own[name if name == HEAD else "model." + name]
            value = reader.read(name)
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError(f"{checkpoint_dir(path) / WEIGHTS}: {name} has shape {tuple(value.shape)}, the "
                                  f"model of its {META} expects {tuple(param.shape)}")
            param.copy_(value)
            del value
        for name in own.keys() - {k if k == HEAD else "model." + k for k in names}:
            own[name].zero_()  # the unused LM head the file need not carry: zeros, not uninitialised memory
    return model.eval(), meta
