"""Offline teacher logits (rlhf/distill/offline.py): top-k values in bf16 and ids round-trip bit for bit.

    python -m pytest -q tests/unit/test_distill_offline.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.distill.losses import teacher_topk
from rlhf.distill.offline import TeacherLogits, TeacherLogitsWriter

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    logits = torch.randn(10, 6, 300, generator=torch.Generator().manual_seed(0)) * 4
    values, indices = teacher_topk(logits, k=20)
    writer = TeacherLogitsWriter(tmp_path, k=20, vocab_size=300, seq_len=6, dtype=dtype)
    writer.write(first_sample=0, values=values[:4], indices=indices[:4])
    writer.write(first_sample=4, values=values[4:], indices=indices[4:])
    writer.close(teacher="t")
    store = TeacherLogits(tmp_path, verify=True)
    order = [7, 0, 9, 3, 4]
    got_values, got_indices = store.read(order)
    assert len(store) == 10 and got_values.dtype == dtype
    assert torch.equal(got_values, values[order].to(dtype))  # the same bits as one rounding of the teacher's
    assert torch.equal(got_indices, indices[order])
    with pytest.raises(IndexError, match="sample 10 is not in the precomputed"):
        store.read([10])


def test_corrupt_or_missing_store_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        TeacherLogits(tmp_path)
    writer = TeacherLogitsWriter(tmp_path, k=2, vocab_size=8, seq_len=3, dtype=torch.bfloat16)
    values, indices = teacher_topk(torch.randn(2, 3, 8), k=2)
    writer.write(first_sample=0, values=values, indices=indices)
    writer.close()
    shard = tmp_path / "topk-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ValueError, match="topk-00000.safetensors: checksum"):
        TeacherLogits(tmp_path, verify=True)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 2\)"):
        writer.write(first_sample=2, values=values[..., :1], indices=indices[..., :1])
