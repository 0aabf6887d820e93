"""Context-parallel chunking (model/context_parallel.py) in one process: which tokens a CP rank holds."""

from __future__ import annotations

import pytest
import torch

from model.context_parallel import ContextParallel, chunk_order, rank_positions

pytestmark = pytest.mark.timeout(60)


def test_rank_holds_chunk_i_and_its_mirror() -> None:
    assert rank_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert rank_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert chunk_order(2) == [0, 3, 1, 2]
    every = torch.cat([rank_positions(96, 4, r) for r in range(4)])
    assert sorted(every.tolist()) == list(range(96))  # each token on exactly one rank
    # Load balance under the causal mask: every rank's queries see the same number of keys.
    work = {r: int((rank_positions(96, 4, r) + 1).sum()) for r in range(4)}
    assert len(set(work.values())) == 1


def test_sequence_must_split_into_2cp_chunks() -> None:
    with pytest.raises(ValueError, match=r"not divisible by 2 x CP = 8.*train.seq_len"):
        rank_positions(100, 4, 0)


def test_cp1_is_the_identity() -> None:
    cp = ContextParallel(None)
    tokens = torch.arange(12).view(2, 6)
    assert not cp.enabled and torch.equal(cp.shard(tokens), tokens)
    assert cp.positions(6).tolist() == [list(range(6))]
