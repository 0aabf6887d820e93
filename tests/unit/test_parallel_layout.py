"""Layout decisions at full size, without allocating anything: pipeline partitions and kv-head placement."""

from __future__ import annotations

import pytest

from model.config import get_config
from train.config import RunConfig


def test_405b_pipeline_partition_counts_embedding_and_head() -> None:
    from train.parallelize import pipeline_partition

    cfg = get_config("llama3_1_405b")
    parts = pipeline_partition(cfg, 16)
    # 128 entries (embedding + 126 blocks + head) over 16 stages: 8 each, so the first stage holds the
    # embedding and 7 blocks and the last 7 blocks and the head (Llama 3's own balancing).
    assert parts == [(8 * i, 8 * i + 8) for i in range(16)]
    first_blocks = [i - 1 for i in range(*parts[0]) if 1 <= i <= cfg.n_layers]
    last_blocks = [i - 1 for i in range(*parts[-1]) if 1 <= i <= cfg.n_layers]
    assert first_blocks == list(range(0, 7)) and last_blocks == list(range(119, 126))


def test_uneven_partition_spreads_the_remainder() -> None:
    from train.parallelize import pipeline_partition

    sizes = [b - a for a, b in pipeline_partition(get_config("llama2_70b"), 6)]  # 82 entries over 6 stages
    assert sum(sizes) == 82 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("tp, ok", [(8, True), (16, True), (3, False)])
def test_405b_tensor_parallel_sizes(tp: int, ok: bool) -> None:
    # 405B has 8 kv heads: TP 8 splits them, TP 16 replicates each on two ranks, TP 3 divides nothing.
    cfg = RunConfig.from_toml("configs/pretrain/llama3_1_405b.toml", [f"--parallel.tp={tp}", "--parallel.pp=16"])
    if ok:
        cfg.validate(world_size=tp * 16 * 2)
    else:
        with pytest.raises(ValueError, match="does not divide n_heads=128"):
            cfg.validate(world_size=tp * 16)
