"""Synthetic pretraining documents: the default short learnable runs, or a stated mean length (MFU benchmark)."""

from __future__ import annotations

import pytest
import torch

from train.config import RunConfig
from train.data import SyntheticDataset

pytestmark = pytest.mark.timeout(60)


def _document_lengths(ds: SyntheticDataset, samples: int) -> list[int]:
    lengths = []
    for i in range(samples):
        ends = (ds[i]["tokens"] == SyntheticDataset.EOD).nonzero().flatten().tolist()
        lengths += [b - a - 1 for a, b in zip(ends, ends[1:])]  # whole documents between two EODs
    return lengths


def test_default_documents_are_short_runs() -> None:
    lengths = _document_lengths(SyntheticDataset(vocab_size=512, seq_len=512, seed=1, num_samples=4), 4)
    assert min(lengths) >= 4 and max(lengths) <= 47


def test_mean_document_length_is_what_is_asked() -> None:
    ds = SyntheticDataset(vocab_size=512, seq_len=8192, seed=1, num_samples=8, document_length=1024)
    lengths = _document_lengths(ds, 8)
    assert min(lengths) >= 512 and max(lengths) <= 1536
    assert abs(sum(lengths) / len(lengths) - 1024) < 150
    assert torch.equal(ds[3]["tokens"], ds[3]["tokens"])  # still a pure function of the index


def test_config_field_is_validated() -> None:
    base = ["--data.synthetic=true"]
    assert RunConfig.from_toml(None, base + ["--data.synthetic_document_length=1024"]).validate()
    with pytest.raises(ValueError, match="synthetic_document_length=-1"):
        RunConfig.from_toml(None, base + ["--data.synthetic_document_length=-1"]).validate()
