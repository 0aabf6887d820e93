"""What the loop trains: the ``Task`` protocol, and ``PretrainTask`` (next-token pretraining) that implements it.

    from train.task import PretrainTask
    result = train.loop.train(cfg, task=PretrainTask())       # the default task

Alignment stages (``rlhf/``) pass their own task with the same members to ``train.loop.train`` and get the
loop's checkpoints, resume, health checks, metrics and pre-emption handling unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from model import comm
from train.config import RunConfig
from train.data import build_datasets


class Task(Protocol):
    """Data, batching, engine arguments and export of one training stage."""

    name: str
    validation_loss: str
    """What the loop's validation loss is, as printed and logged (e.g. "held-out next-token loss")."""
    perplexity: bool
    """Whether exp(validation loss) is a perplexity (a per-token cross-entropy); not for a ranking loss."""

    def build_datasets(self, cfg: Any, model_cfg: Any, *, dp_size: int, run_dir: Path) -> tuple[Any, Any, int]:
        """(train dataset, validation dataset or None, end-of-document id or -1)."""
        ...

    def loader(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
               consumed_samples: int, eod: int) -> Iterable[dict[str, Any]]:
        """Micro-batch dicts of this DP rank; the loader has a ``consumed_samples`` attribute (global samples)."""
        ...

    def engine_kwargs(self, cfg: Any, model_cfg: Any) -> dict[str, Any]:
        """Extra ``TrainEngine`` arguments (``objective``, ``init_weights``)."""
        ...

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        """Write the trained model (every rank calls it: consolidation is collective)."""
        ...

    # Optional: ``step_metrics(engine) -> dict[str, float]``, called by every rank after each step (collective);
    # its keys join the step's record in metrics.jsonl / wandb (DPO: implicit rewards, accuracy; rlhf.dpo.train).
    # Optional: ``before_training(engine, run_dir, *, rank)``, called by every rank once, on a fresh start only,
    # before the first step (collective): what must be measured on the initial weights (SFT's held-out loss
    # "before", rlhf.sft.train), so that no second model is built for it at the end.


class PretrainTask:
    """Pretraining: synthetic documents or prepared shards, ``GlobalBatchLoader``, native weights at the end."""

    name = "pretrain"
    validation_loss = "held-out next-token loss"
    perplexity = True

    def build_datasets(self, cfg: RunConfig, model_cfg: Any, *, dp_size: int,
                       run_dir: Path) -> tuple[Any, Any, int]:
        return build_datasets(cfg, model_cfg, dp_size=dp_size, run_dir=run_dir)

    def loader(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
               consumed_samples: int, eod: int) -> Any:
        """An iterable of micro-batch dicts with a ``consumed_samples`` attribute (global samples so far)."""
        from data_pipeline.global_batch import GlobalBatchLoader
        from data_pipeline.loader import pretrain_collate

        return GlobalBatchLoader(dataset, collate=pretrain_collate(eod), global_batch_size=global_batch_size,
                                 micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                 consumed_samples=consumed_samples)

    def engine_kwargs(self, cfg: RunConfig, model_cfg: Any) -> dict[str, Any]:
        """Extra ``TrainEngine`` arguments (``objective``, ``init_weights``); none for pretraining."""
        return {}

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        export_final(engine, model_cfg, out_dir, rank=rank)


def exported_weights(engine: Any, out_dir: Path) -> Any:
    """Collective context yielding, on global rank 0, the whole model's weights to stream from (``names()``,
    ``full(name)``, ``specs()``, ``source(model_cfg)``), None elsewhere. The engine builds it from every rank's own
    fragments (``TrainEngine.exported_weights``); engines without it hand over a state dict."""
    if hasattr(engine, "exported_weights"):
        return engine.exported_weights(out_dir)
    import contextlib

    from train.portable import StateDictExport

    state_dict = engine.consolidated_state_dict()
    return contextlib.nullcontext(StateDictExport(state_dict) if state_dict else None)


def export_final(engine: Any, model_cfg: Any, out_dir: Path, *, rank: int,
                 sidecars: dict[str, dict[str, Any]] | None = None) -> None:
    """Native-format weights (config.json + safetensors) for generation and conversion, streamed: rank 0 writes
    one tensor at a time, read from every rank's own fragments; no rank gathers the model. A tied head is stored
    once (``write_native``). ``sidecars``: JSON files written beside the weights (e.g. the alignment stages'
    ``rlhf.json``: tokenizer, chat template), so the export describes itself. The one export of every stage."""
    import json

    from model.checkpoints.native import write_native

    with exported_weights(engine, out_dir) as weights:  # collective: every rank enters
        if weights is not None:
            write_native(weights.source(model_cfg), model_cfg, out_dir, overwrite=True)
            for name, content in (sidecars or {}).items():
                (Path(out_dir) / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
    comm.barrier()
