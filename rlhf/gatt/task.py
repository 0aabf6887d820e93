"""GAtt fine-tuning as a ``train.loop`` task: ``GAttConfig`` (the run sections + ``[gatt]``) and the task.

    cfg = GAttConfig.from_toml("configs/rlhf/gatt_tiny.toml", ["--gatt.init=runs/rlhf/final_policy"])
    result = train.loop.train(cfg, task=GAttTask(cfg.gatt))

The task reads the GAtt dialogues of ``[data] path`` (``rlhf.gatt.data``), encodes them with the chat format and
puts the loss on the last assistant turn only (``train_turns = "last"``; ``"all"`` is multi-turn SFT).
"""

from __future__ import annotations

import json
import os
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import TEMPLATES
from train.config import ConfigError, RunConfig, check
from train.task import PretrainTask


@dataclass(frozen=True)
class GAttSection:
    init: str = ""
    """Checkpoint the fine-tuning starts from (the current RLHF model); "" = the run's seeded init."""
    template: str = "llama2"
    """Chat format: "llama2" or "llama3"."""
    train_turns: str = "last"
    """"last": loss on the last assistant turn only (GAtt); "all": every assistant turn (plain SFT)."""
    truncate: str = "random"
    """"random": cut each dialogue after a random number of turns (every depth trained); "none"."""
    valid_fraction: float = 0.05
    """Share of the dialogues held out for the validation loss."""


class GAttTask(PretrainTask):
    """``train.loop`` task: chat-encoded dialogues of ``[data] path`` with the GAtt loss mask."""

    name = "gatt"
    validation_loss = "held-out last-turn answer loss"
    perplexity = True

    def __init__(self, section: GAttSection) -> None:
        self.section = section
        self.tokenizer = ""  # data.tokenizer, set by build_datasets (the export's rlhf.json names it)

    def build_datasets(self, cfg: Any, model_cfg: Any, *, dp_size: int, run_dir: Path) -> tuple[Any, Any, int]:
        from model.tokenizer import load_tokenizer
        from rlhf.gatt.data import ExampleDataset, read_gatt_jsonl, training_examples

        if not cfg.data.tokenizer:
            raise ConfigError("gatt train: set data.tokenizer (the model's tokenizer.model)")
        tok = load_tokenizer(cfg.data.tokenizer)
        self.tokenizer = cfg.data.tokenizer
        dialogues = read_gatt_jsonl(cfg.data.path)
        rng = random.Random(cfg.train.seed)
        valid_mask = [rng.random() < self.section.valid_fraction for _ in dialogues]
        s, t = self.section, cfg.train
        common = {"tokenizer": tok, "template": s.template, "train_turns": s.train_turns, "truncate": s.truncate}
        train_ex, report = training_examples([d for d, v in zip(dialogues, valid_mask) if not v], seed=t.seed,
                                             **common)
        valid_ex, valid_report = training_examples([d for d, v in zip(dialogues, valid_mask) if v], seed=t.seed + 1,
                                                   **common)
        too_long = sum(len(e.ids) > cfg.data.seq_len + 1 for e in train_ex)
        if int(os.environ.get("RANK", "0")) == 0:  # before the datasets, which refuse zero usable examples
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "data_report.json").write_text(json.dumps({
                "file": str(cfg.data.path), "dialogues": len(dialogues), "held_out": sum(valid_mask),
                "train": dict(report), "valid": dict(valid_report),
                f"train examples longer than data.seq_len={cfg.data.seq_len} (dropped)": too_long}, indent=2) + "\n")
        n_valid = t.eval_batches * t.micro_batch_size * dp_size if t.eval_every > 0 and valid_ex else 0
        train_ds = ExampleDataset(train_ex, seq_len=cfg.data.seq_len, num_samples=t.steps * t.global_batch_size,
                                  seed=t.seed, pad_id=tok.pad_id)
        valid_ds = ExampleDataset(valid_ex, seq_len=cfg.data.seq_len, num_samples=n_valid, seed=t.seed + 1,
                                  pad_id=tok.pad_id) if n_valid else None
        print(f"gatt data {cfg.data.path}: {dict(report)}; {len(train_ds.examples)} train / "
              f"{len(valid_ex)} valid examples; {train_ds.dropped} longer than data.seq_len dropped", flush=True)
        return train_ds, valid_ds, -1  # no EOD splitting: every turn attends to the first user message

    def loader(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
               consumed_samples: int, eod: int) -> Any:
        from data_pipeline.global_batch import GlobalBatchLoader
        from rlhf.gatt.data import collate_trimmed

        return GlobalBatchLoader(dataset, collate=collate_trimmed, global_batch_size=global_batch_size,
                                 micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                 consumed_samples=consumed_samples)

    def engine_kwargs(self, cfg: Any, model_cfg: Any) -> dict[str, Any]:
        if not self.section.init:
            return {}
        from model.checkpoints import open_checkpoint
        from rlhf.paths import checkpoint_dir, resolve_path

        # lazy: each rank reads its TP slices only; a run directory means its export (PPO: best_policy)
        weights = open_checkpoint(checkpoint_dir(resolve_path(self.section.init)))
        ckpt_cfg = weights.cfg
        if (ckpt_cfg.dim, ckpt_cfg.n_layers, ckpt_cfg.vocab_size) != (model_cfg.dim, model_cfg.n_layers,
                                                                      model_cfg.vocab_size):
            raise ConfigError(f"gatt.init={self.section.init!r} has dim {ckpt_cfg.dim}, {ckpt_cfg.n_layers} layers, "
                              f"vocab {ckpt_cfg.vocab_size}; the run's model {model_cfg.name!r} differs: set "
                              "[model] / [model.overrides] to the checkpoint's shape")
        return {"init_weights": weights}


    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        """The native checkpoint of the fine-tuned model + ``rlhf.json`` (``rlhf.export``)."""
        from rlhf.export import export_policy, policy_meta

        meta = policy_meta(stage="gatt", tokenizer=self.tokenizer, template=self.section.template,
                           max_len=model_cfg.max_seq_len, init=self.section.init)
        export_policy(engine, model_cfg, out_dir, rank=rank, meta=meta)


@dataclass(frozen=True)
class GAttConfig(RunConfig):
    """GAtt fine-tuning: every run section (``[data] path`` = the GAtt dialogues JSONL) plus ``[gatt]``."""

    PRESETS: typing.ClassVar[str] = "configs/rlhf/"
    UNUSED: typing.ClassVar[tuple[str, ...]] = ("data.synthetic", "data.split")
    DOCS: typing.ClassVar[dict[str, str]] = {
        "data.path": "The GAtt dialogues: a ``python -m rlhf.gatt build`` JSONL (or {\"messages\": [...]} dialogues).",
        "data.tokenizer": "The model's tokenizer.model (GAtt encodes the chat text itself).",
    }
    gatt: GAttSection = field(default_factory=GAttSection)

    def model_config(self) -> Any:
        """The shape of ``gatt.init`` (its own config; ``[model.overrides]`` on top), else ``[model] name``."""
        from rlhf.config import init_model_config

        return init_model_config(self, self.gatt.init, key="gatt.init")

    def validate(self, *, world_size: int | None = None) -> GAttConfig:
        g = self.gatt
        check(g.template in TEMPLATES, f"gatt.template={g.template!r}: use one of {list(TEMPLATES)}")
        check(g.train_turns in ("last", "all"), f"gatt.train_turns={g.train_turns!r}: use \"last\" (GAtt) or "
              "\"all\" (multi-turn SFT)")
        check(g.truncate in ("random", "none"), f"gatt.truncate={g.truncate!r}: use \"random\" or \"none\"")
        check(0.0 <= g.valid_fraction < 1.0, f"gatt.valid_fraction={g.valid_fraction}: must be in [0, 1)")
        check(bool(self.data.tokenizer), "data.tokenizer is empty: set --data.tokenizer=PATH (the model's "
              "tokenizer.model; GAtt encodes chat text itself)")
        self.check_unused()
        super().validate(world_size=world_size)
        return self


def load_train_config(path: str | None, overrides: list[str]) -> tuple[GAttConfig, GAttSection]:
    """``(GAttConfig, its [gatt] section)`` from a TOML preset and ``--section.key=value`` overrides."""
    cfg = GAttConfig.from_toml(path, overrides)
    return cfg, cfg.gatt
