"""Teacher logits precomputed to disk (top-k per token, bf16/fp16 values, int32 ids), read back bit for bit.

    python -m rlhf.distill --config configs/rlhf/distill_tiny.toml --distill.precompute_to runs/teacher_logits
    store = TeacherLogitsWriter(out_dir, k=64, vocab_size=512, seq_len=256, dtype=torch.bfloat16)
    store.write(first_sample=0, values=values, indices=indices); store.close(source="teacher dir")
    reader = TeacherLogits(out_dir); values, indices = reader.read(sample_indices)      # [n, seq, k] each

Layout: ``index.json`` (k, vocab_size, seq_len, dtype, sample count, the teacher and the data it came from, and
one entry per shard ``{file, first, count, sha256}``) + ``topk-00000.safetensors`` ... holding ``values``
``[count, seq, k]`` and ``indices`` ``[count, seq, k]``. Samples are the dataset's indices, so the training loader,
at any DP size or resume point, looks up exactly the rows of its micro-batch. Values are stored in the given
16-bit dtype: reading them back returns the same bits (the round trip is exact); the training loss then sees the
teacher logits rounded once to bf16, which is what the online mode's ``distill.teacher_dtype`` can match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoints.common import load_safetensors
from model.checkpoints.streaming import TensorSpec, hash_file, write_safetensors

INDEX = "index.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TeacherLogitsWriter:
    """Appends shards of consecutive samples; ``close`` publishes ``index.json`` (readers need it)."""

    def __init__(self, out_dir: str | Path, *, k: int, vocab_size: int, seq_len: int, dtype: torch.dtype) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.k, self.vocab_size, self.seq_len, self.dtype = k, vocab_size, seq_len, dtype
        self.shards: list[dict[str, Any]] = []

    def write(self, *, first_sample: int, values: Tensor, indices: Tensor) -> None:
        count = values.shape[0]
        if values.shape != (count, self.seq_len, self.k) or indices.shape != values.shape:
            raise ValueError(f"teacher top-k shard: values {tuple(values.shape)} / indices {tuple(indices.shape)}, "
                             f"expected ({count}, {self.seq_len}, {self.k})")
        name = f"topk-{len(self.shards):05d}.safetensors"
        tensors = {"values": values.to(self.dtype).contiguous(), "indices": indices.to(torch.int32).contiguous()}
        specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
        record = write_safetensors(self.out_dir / name, specs, tensors.__getitem__)
        self.shards.append({"file": name, "first": int(first_sample), "count": int(count), "sha256": record.sha256})

    def close(self, **provenance: Any) -> Path:
        index = {"k": self.k, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                 "dtype": next(k for k, v in DTYPES.items() if v == self.dtype),
                 "num_samples": sum(s["count"] for s in self.shards), "shards": self.shards, **provenance}
        tmp = self.out_dir / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, default=str) + "\n")
        tmp.replace(self.out_dir / INDEX)
        return self.out_dir


class TeacherLogits:
    """Random access by sample index to a precomputed top-k store; shards are loaded lazily and kept."""

    def __init__(self, directory: str | Path, *, verify: bool = False) -> None:
        self.directory = Path(directory)
        path = self.directory / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory}: no {INDEX}; precompute the teacher logits first "
                                    "(python -m rlhf.distill ... --distill.precompute_to=DIR)")
        self.index = json.loads(path.read_text())
        self.k, self.vocab_size, self.seq_len = self.index["k"], self.index["vocab_size"], self.index["seq_len"]
        self._loaded: dict[str, dict[str, Tensor]] = {}
        if verify:
            for shard in self.index["shards"]:
                if hash_file(self.directory / shard["file"]).sha256 != shard["sha256"]:
                    raise ValueError(f"{self.directory / shard['file']}: checksum differs from {path}")

    def __len__(self) -> int:
        return int(self.index["num_samples"])

    def _shard(self, sample: int) -> tuple[dict[str, Tensor], int]:
        for shard in self.index["shards"]:
            if shard["first"] <= sample < shard["first"] + shard["count"]:
                if shard["file"] not in self._loaded:
                    self._loaded[shard["file"]] = load_safetensors(self.directory / shard["file"])
                return self._loaded[shard["file"]], sample - shard["first"]
        raise IndexError(f"{self.directory}: sample {sample} is not in the precomputed teacher logits "
                         f"({len(self)} samples); precompute at least as many samples as the run trains on")

    def read(self, samples: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        """``(values, indices int64)`` of the given samples, stacked: ``[n, seq, k]``."""
        rows = [self._shard(int(s)) for s in samples]
        values = torch.stack([shard["values"][i] for shard, i in rows])
        indices = torch.stack([shard["indices"][i] for shard, i in rows]).long()
        return values, indices
