"""Pretraining batches: the global-batch loader over megatron datasets (DP-size-independent order, exact resume
across DP sizes) and the collate's document ids. The loader's own geometry checks: tests/unit/test_global_batch.py.

    pytest tests/unit/test_data_loader.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.cleaning import CleaningConfig
from data_pipeline.global_batch import GlobalBatchLoader
from data_pipeline.loader import build_pretrain_datasets, document_ids, pretrain_collate
from data_pipeline.readers import SourceSpec
from data_pipeline.tokenize_shards import PrepareConfig, prepare
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(120)
G, MB = 8, 2


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory, shared_data):
    tok = require_file(shared_data / "checkpoints" / "stories260K" / "tok512.model")
    tmp = tmp_path_factory.mktemp("loader")
    raw = tmp / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": f"Lily saw {i} birds in the park. " * (1 + i % 4)}) + "\n"
                           for i in range(200)))
    prepare(PrepareConfig(sources=[SourceSpec.parse(f"s={raw}")], tokenizer=tok, output=tmp / "out", workers=0,
                          cleaning=CleaningConfig.disabled(), progress=False))
    train, valid, test = build_pretrain_datasets(data_dir_or_blend=tmp / "out", seq_len=32, seed=5, split="90,5,5",
                                                 num_samples=(96, 4, 0), tokenizer_info={"vocab_size": 512, "eod": 2},
                                                 cache_dir=tmp / "cache")
    assert test is None and valid is not None and len(train) >= 96
    return train


def _loader(ds, *, dp_rank: int, dp_size: int, consumed_samples: int = 0) -> GlobalBatchLoader:
    return GlobalBatchLoader(ds, collate=pretrain_collate(ds.config.tokenizer.eod), global_batch_size=G,
                             micro_batch_size=MB, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples)


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(r.tolist()) for r in batch["input_ids"]]


def _run(ds, dp: int, consumed: int, max_batches: int | None = None) -> tuple[list[tuple[int, ...]], int]:
    """Global-order rows seen by all ranks (rank r's rows of a global batch after rank r-1's) and the state."""
    loaders = [_loader(ds, dp_rank=r, dp_size=dp, consumed_samples=consumed) for r in range(dp)]
    iters = [iter(x) for x in loaders]
    per_rank_micro = G // dp // MB
    rows: list[tuple[int, ...]] = []
    n = 0
    while max_batches is None or n < max_batches:
        try:
            per_rank = [[row for _ in range(per_rank_micro) for row in _rows(next(it))] for it in iters]
        except StopIteration:
            break
        rows += [row for rank_rows in per_rank for row in rank_rows]
        n += 1
    states = {x.state_dict()["consumed_samples"] for x in loaders}
    assert len(states) == 1
    return rows, states.pop()


def test_batches_have_shapes_labels_and_document_ids(train_ds):
    b = next(iter(_loader(train_ds, dp_rank=0, dp_size=2)))
    assert set(b) == {"input_ids", "labels", "loss_mask", "document_ids"}
    assert b["input_ids"].shape == (MB, 32) and b["input_ids"].dtype == torch.long
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    ids, tok = b["document_ids"], b["input_ids"]
    assert ids[0, 0] == 0 and (ids[:, 1:] - ids[:, :-1]).ge(0).all()
    eod_pos = (tok == 2).nonzero()
    assert len(eod_pos) > 0
    for r, t in eod_pos.tolist():
        if t + 1 < tok.shape[1]:
            assert ids[r, t + 1] == ids[r, t] + 1
    assert document_ids(torch.tensor([5, 2, 7, 2, 2, 9]), 2).tolist() == [0, 0, 1, 1, 2, 3]


def test_resume_at_other_dp_sizes_continues_exactly(train_ds):
    full, end = _run(train_ds, 1, 0)
    assert len(full) == len(train_ds) // G * G and end == len(full)
    first, k = _run(train_ds, 2, 0, max_batches=3)
    assert k == 3 * G and first == full[:k]
    for dp in (1, 4):
        rest, _ = _run(train_ds, dp, k)
        seen = first + rest
        assert seen == full  # same order, so the union equals the uninterrupted run's
        assert len(set(seen)) == len(set(full))  # and nothing repeats that the full run does not repeat
    loader = _loader(train_ds, dp_rank=0, dp_size=4)
    loader.load_state_dict({"consumed_samples": k})
    assert _rows(next(iter(loader))) == full[k : k + MB]


def test_cache_dir_is_used_without_a_process_group(train_ds):
    import torch.distributed as dist

    assert not dist.is_initialized()
    cache = Path(train_ds.config.path_to_cache)
    assert any(cache.glob("*GPTDataset-train-shuffle_index.npy"))
