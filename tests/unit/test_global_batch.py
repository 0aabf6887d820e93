"""The one global-batch loader (``data_pipeline.global_batch.GlobalBatchLoader``): the same global batches at any
DP size, exact resume from ``consumed_samples``, bad batch geometry refused. No data files needed; the same loader
over megatron datasets with the pretraining collate: tests/unit/test_data_loader.py; over GAtt items:
tests/unit/test_gatt.py; the stages' resume at other layouts: tests/unit/test_rlhf_resume.py, tests/distributed.

    pytest tests/unit/test_global_batch.py
"""

from __future__ import annotations

import pytest
import torch

from data_pipeline.global_batch import GlobalBatchLoader

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_global_batch_order_is_independent_of_dp_and_resumes(dp_size: int) -> None:
    data = list(range(40))

    def collate(xs):
        return {"x": torch.tensor(xs)}

    def global_batches(dp: int, consumed: int = 0) -> list[list[int]]:
        loaders = [GlobalBatchLoader(data, collate=collate, global_batch_size=8, micro_batch_size=2, dp_rank=r,
                                     dp_size=dp, consumed_samples=consumed) for r in range(dp)]
        per_rank = [[mb["x"].tolist() for mb in ld] for ld in loaders]
        steps = len(per_rank[0]) // (8 // dp // 2)
        n = 8 // dp // 2
        return [sorted(x for r in range(dp) for mb in per_rank[r][s * n:(s + 1) * n] for x in mb)
                for s in range(steps)]

    assert global_batches(dp_size) == global_batches(1) == [list(range(i, i + 8)) for i in range(0, 40, 8)]
    assert global_batches(dp_size, consumed=16) == global_batches(1)[2:]
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchLoader(data, collate=collate, global_batch_size=6, micro_batch_size=4, dp_rank=0, dp_size=1)


def test_bad_batch_geometry_is_refused() -> None:
    data = list(range(40))

    def collate(xs):
        return {"x": torch.tensor(xs)}

    with pytest.raises(ValueError, match="divisible by dp_size"):
        GlobalBatchLoader(data, collate=collate, global_batch_size=6, micro_batch_size=1, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GlobalBatchLoader(data, collate=collate, global_batch_size=8, micro_batch_size=3, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchLoader(data, collate=collate, global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2)


def test_state_dict_round_trip_continues_where_it_stopped() -> None:
    data = list(range(40))
    loader = GlobalBatchLoader(data, collate=lambda xs: {"x": torch.tensor(xs)}, global_batch_size=8,
                               micro_batch_size=4, dp_rank=0, dp_size=1)
    it = iter(loader)
    assert next(it)["x"].tolist() == [0, 1, 2, 3] and loader.consumed_samples == 0  # mid global batch
    assert next(it)["x"].tolist() == [4, 5, 6, 7] and loader.state_dict() == {"consumed_samples": 8}
    resumed = GlobalBatchLoader(data, collate=lambda xs: {"x": torch.tensor(xs)}, global_batch_size=8,
                                micro_batch_size=4, dp_rank=0, dp_size=1)
    resumed.load_state_dict(loader.state_dict())
    assert len(resumed) == 8 and next(iter(resumed))["x"].tolist() == [8, 9, 10, 11]
