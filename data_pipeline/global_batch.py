"""The one training data order of every stage: DP-size-independent global batches with exact resume.

    from data_pipeline.global_batch import GlobalBatchLoader
    from data_pipeline.loader import pretrain_collate
    loader = GlobalBatchLoader(dataset, collate=pretrain_collate(eod), global_batch_size=512, micro_batch_size=4,
                               dp_rank=r, dp_size=dp, consumed_samples=ckpt.get("consumed_samples", 0))
    for mb in loader: ...          # collate([dataset[i] for i in one micro-batch's indices])

Pretraining (megatron ``GPTDataset`` samples, ``data_pipeline.loader.pretrain_collate``), SFT and reward models
(``rlhf.batching.stack_rows`` / ``collate_pairs``), GAtt (``rlhf.gatt.data.collate_trimmed``), distillation and
DPO all read their data through this class; only the ``collate`` function differs.

Order: global batch ``b`` is samples ``[c0 + b*G, c0 + (b+1)*G)`` of the dataset (already shuffled, seeded, by
whoever built it), ``c0`` the consumed count at start; rank ``r`` of ``dp`` takes the ``r``-th contiguous
``G/dp`` of it, then splits that into micro-batches. The sequence of global batches therefore does not depend
on the DP size, and ``consumed_samples`` (global samples, advanced by ``G`` when a rank hands out the last
micro-batch of a global batch, i.e. the state after that optimizer step) resumes exactly at any DP size.
A tail shorter than one global batch is not handed out (every step sees ``G`` samples).

It sits in data_pipeline/, below train/ and rlhf/, so that both import it (``tests/unit/test_import_graph.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor

Collate = Callable[[Sequence[Any]], dict[str, Tensor]]
"""Samples of one micro-batch (in order) -> the micro-batch's tensors."""


class GlobalBatchLoader:
    """Deterministic micro-batches for one DP rank; the global order is independent of the DP size."""

    def __init__(self, dataset: Any, *, collate: Collate, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0) -> None:
        """``dataset``: anything with ``len`` and ``[i]``; ``collate``: see ``Collate``."""
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size}")
        if (global_batch_size // dp_size) % micro_batch_size:
            raise ValueError(f"global_batch_size/dp_size = {global_batch_size // dp_size} is not divisible by "
                             f"micro_batch_size {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.dataset, self.collate = dataset, collate
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = int(consumed_samples)

    def __len__(self) -> int:
        """Micro-batches left for this rank."""
        left = max(0, (len(self.dataset) - self.consumed_samples) // self.global_batch_size)
        return left * (self.global_batch_size // self.dp_size // self.micro_batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        g, mb = self.global_batch_size, self.micro_batch_size
        per_rank = g // self.dp_size
        start = self.consumed_samples
        while start + g <= len(self.dataset):
            base = start + self.dp_rank * per_rank
            n_micro = per_rank // mb
            for m in range(n_micro):
                batch = self.collate([self.dataset[i] for i in range(base + m * mb, base + (m + 1) * mb)])
                if m == n_micro - 1:
                    self.consumed_samples = start + g  # the state after this global batch's step
                yield batch
            start += g

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.consumed_samples = int(d["consumed_samples"])
