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


class PretrainTask:
    """Pretraining: synthetic documents or prepared shards, ``PretrainLoader``, native weights at the end."""

    name = "pretrain"

    def build_datasets(self, cfg: RunConfig, model_cfg: Any, *, dp_size: int,
                       run_dir: Path) -> tuple[Any, Any, int]:
        return build_datasets(cfg, model_cfg, dp_size=dp_size, run_dir=run_dir)

    def loader(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
               consumed_samples: int, eod: int) -> Any:
        """An iterable of micro-batch dicts with a ``consumed_samples`` attribute (global samples so far)."""
        from data_pipeline.loader import PretrainLoader

        return PretrainLoader(dataset, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                              dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples, eod_id=eod)

    def engine_kwargs(self, cfg: RunConfig, model_cfg: Any) -> dict[str, Any]:
        """Extra ``TrainEngine`` arguments (``objective``, ``init_weights``); none for pretraining."""
        return {}

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        export_final(engine, model_cfg, out_dir, rank=rank)


def export_final(engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
    """Consolidated native-format weights (config.json + model.safetensors) for generation and conversion."""
    state_dict = engine.consolidated_state_dict()  # collective under ZeRO-3 / PP: every rank calls it
    if rank == 0 and state_dict:
        from model.checkpoints.native import save_native

        save_native(state_dict, model_cfg, out_dir, overwrite=True)
    comm.barrier()
