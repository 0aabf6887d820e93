"""What SFT and reward-model training share: a loop *task* over in-memory datasets, and the stage CLI.

    task = SFTTask(cfg)                       # or RewardTask(cfg); reads, splits and tokenizes the files
    cfg = task.resolve(world_size=2)          # steps from the data, warmup, eval batches; validated
    result = train(cfg, task=task)            # train.loop: checkpoints, resume, metrics, pre-emption

A task gives ``train.loop.train`` its datasets (lists of samples, the same on every rank: built from the files
deterministically), a ``data_pipeline.global_batch.GlobalBatchLoader`` (DP-size-independent order, exact resume), the engine objective
and the initial weights. ``stage_main`` is the body of ``python -m rlhf.sft`` / ``python -m rlhf.reward``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from data_pipeline.global_batch import GlobalBatchLoader
from rlhf.paths import checkpoint_dir, resolve_path
from train.config_reader import ConfigError, add_config_arguments


class StageTask:
    """Base of the SFT and reward-model tasks (the ``train.task.Task`` protocol)."""

    name = "stage"
    validation_loss = "held-out loss"
    perplexity = False

    def __init__(self, cfg: Any) -> None:
        from model.tokenizer import load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(resolve_path(cfg.data.tokenizer))
        self.train_set: list[Any] = []
        self.valid_set: list[Any] = []
        self.report: dict[str, Any] = {}
        self._built = False

    # ---- to implement ------------------------------------------------------------------------------
    def build(self) -> None:
        """Fill ``train_set`` (all epochs, in training order), ``valid_set`` and ``report``."""
        raise NotImplementedError

    def collate(self, samples: Sequence[Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def objective(self) -> Any:
        return None  # the engine's default: the language-model objective

    # ---- the loop's task interface -----------------------------------------------------------------
    def resolve(self, *, world_size: int) -> Any:
        """The config with the steps, warmup and eval batches the data implies; validated."""
        cfg = self.cfg
        # Everything but the step count, which the data decides when train.steps = 0.
        (cfg if cfg.train.steps else cfg.replace(train={"steps": 1})).validate(world_size=world_size)
        self.check_vocab(cfg.model_config())
        if not self._built:
            self.build()
            self._built = True
        try:
            cfg = cfg.with_schedule(num_samples=len(self.train_set))
        except ConfigError as err:  # too few usable records: say which were skipped and why before exiting
            if rank() == 0:
                self.write_report(cfg.run_dir)
            raise ConfigError(f"{err}. What each file gave and which records were skipped: "
                              f"{cfg.run_dir / 'data_report.json'}") from None
        available = len(self.valid_set) // (cfg.train.micro_batch_size * cfg.dp_size(world_size))
        if cfg.train.eval_every and available < cfg.train.eval_batches:
            note = (f"validation: {len(self.valid_set)} held-out samples give {available} micro-batches per DP "
                    f"rank, train.eval_batches {cfg.train.eval_batches} -> {available}")
            self.report.setdefault("notes", []).append(note + ("" if available else " (validation off)"))
            cfg = cfg.replace(train={"eval_batches": max(available, 1),
                                     "eval_every": cfg.train.eval_every if available else 0})
        self.cfg = cfg.validate(world_size=world_size)
        return self.cfg

    def check_vocab(self, model_cfg: Any) -> None:
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"data.tokenizer={self.cfg.data.tokenizer}: {self.tokenizer.vocab_size} pieces, but the "
                              f"model ({model_cfg.name}) has vocab_size={model_cfg.vocab_size}; use the tokenizer the "
                              "model was pretrained with")

    def build_datasets(self, cfg: Any, model_cfg: Any, *, dp_size: int, run_dir: Path) -> tuple[Any, Any, int]:
        if not self._built:
            self.build()
            self._built = True
        valid = self.valid_set if (self.valid_set and cfg.train.eval_every) else None
        return self.train_set, valid, int(self.tokenizer.eos_id)

    def loader(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
               consumed_samples: int, eod: int) -> GlobalBatchLoader:
        return GlobalBatchLoader(dataset, collate=self.collate, global_batch_size=global_batch_size,
                                 micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                 consumed_samples=consumed_samples)

    def init_weights(self) -> Any:
        """A lazy reader of the init checkpoint (``open_checkpoint``): each rank reads only its TP slices."""
        if not self.cfg.stage.init_checkpoint:
            return None
        from model.checkpoints import open_checkpoint

        return open_checkpoint(checkpoint_dir(resolve_path(self.cfg.stage.init_checkpoint)))

    def engine_kwargs(self, cfg: Any, model_cfg: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"init_weights": self.init_weights()}
        objective = self.objective()
        if objective is not None:
            kwargs["objective"] = objective
        return kwargs

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        raise NotImplementedError

    def sidecar(self) -> dict[str, Any]:
        """What generation / scoring needs besides the weights (written next to the exported model)."""
        return {"tokenizer": str(resolve_path(self.cfg.data.tokenizer).resolve()), "template": self.cfg.stage.template,
                "max_len": self.cfg.data.seq_len, "split": {"valid_fraction": self.cfg.stage.valid_fraction,
                                                            "seed": self.cfg.stage.split_seed}}

    def write_report(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "data_report.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def stage_main(argv: Sequence[str] | None, *, config_cls: type, task_cls: type, run: Callable[..., Any], prog: str,
               doc: str | None, example: str) -> int:
    """The body of ``python -m rlhf.sft`` / ``rlhf.reward``: read the config (``--help`` lists it), build the task,
    run. A ``ConfigError`` (config, data files, validation in the loop) prints one line and exits 2; anything else
    raised by the training keeps its traceback."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_cls, prog=prog, example=example)
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = config_cls.from_toml(args.config, overrides)
        task = task_cls(cfg)
        task.resolve(world_size=world_size())
        result, _ = run(task.cfg, task=task)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result.exit_code


def run_stage(cfg: Any, task: StageTask, *, engine_factory: Callable[..., Any] | None = None,
              topology_factory: Callable[[Any], Any] | None = None, print_fn: Any = print) -> Any:
    """Resolve, report the data, train. Returns the loop's ``RunResult``."""
    from train.loop import train

    cfg = task.resolve(world_size=world_size())
    if rank() == 0:
        task.write_report(cfg.run_dir)
        for line in task.report.get("summary", []):
            print_fn(f"[{task.name}] {line}")
        for note in task.report.get("notes", []):  # e.g. validation reduced or off for lack of held-out data
            print_fn(f"[{task.name}] note: {note}")
    return train(cfg, task=task, engine_factory=engine_factory, topology_factory=topology_factory,
                 print_fn=print_fn)
