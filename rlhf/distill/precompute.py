"""Offline mode, step one: the teacher's top-k logits of every training sample, written to disk once.

    python -m rlhf.distill --config configs/rlhf/distill_tiny.toml --distill.precompute_to runs/teacher_logits
    torchrun --nproc-per-node 2 -m rlhf.distill --config ... --distill.teacher_tp 2 --distill.precompute_to DIR

Every rank of the (single) teacher group takes its own ``train.micro_batch_size`` rows of each chunk, the teacher
runs them together (``Teacher.topk``), and rank 0 writes the chunk as one shard (``rlhf.distill.offline``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from model import comm
from train.config_reader import ConfigError

VALID = "valid"
"""Subdirectory holding the held-out samples' logits (validation during training reads them)."""


@dataclass
class PrecomputeResult:
    samples: int
    exit_code: int = 0
    reason: str = "precomputed"


def precompute_teacher_logits(task: Any) -> PrecomputeResult:
    from rlhf.paths import resolve_path

    d = task.cfg.distill
    if not comm.initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the process group
        from train.hooks import default_topology

        default_topology(task.cfg)
    if comm.world_size() != d.teacher_tp:
        raise ConfigError(f"distill.precompute_to: run it on distill.teacher_tp={d.teacher_tp} rank(s) (one teacher "
                          f"group), not {comm.world_size()}")
    teacher = task.teacher()
    out = resolve_path(d.precompute_to)
    done = 0
    for rows, where in ((task.train_set, out), (task.valid_set, out / VALID)):
        if len(rows):
            done += _write_store(task, teacher, rows, where)
    comm.barrier()
    return PrecomputeResult(samples=done)


def _write_store(task: Any, teacher: Any, rows: Any, out: Any) -> int:
    """Top-k of ``rows`` in chunks of ``micro_batch_size x teacher_tp`` into the store ``out``; samples written."""
    from rlhf.distill.offline import DTYPES, TeacherLogitsWriter

    cfg, d, k = task.cfg, task.cfg.distill, task.cfg.vocab_k
    per_rank = cfg.train.micro_batch_size
    chunk = per_rank * d.teacher_tp
    writer = TeacherLogitsWriter(out, k=k, vocab_size=teacher.vocab_size, seq_len=cfg.data.seq_len,
                                 dtype=DTYPES["bf16" if d.teacher_dtype == "bf16" else "fp32"])
    rank, done = comm.rank(), 0
    for start in range(0, len(rows), chunk):
        # A short last chunk is padded with its first row (each rank must run the teacher), then trimmed.
        ids = [min(i, len(rows) - 1) if i < len(rows) else start for i in range(start, start + chunk)]
        batch = task.collate([rows[i] for i in ids[rank * per_rank : (rank + 1) * per_rank]])
        values, indices = teacher.topk(batch["input_ids"], batch["document_ids"], k=k)
        values = torch.cat(comm.all_gather(values.contiguous(), group=teacher.group))
        indices = torch.cat(comm.all_gather(indices.contiguous(), group=teacher.group))
        count = min(chunk, len(rows) - start)
        if rank == 0:
            writer.write(first_sample=start, values=values[:count], indices=indices[:count])
        done = start + count
    if rank == 0:
        writer.close(teacher=d.teacher, data=cfg.data.path or ("synthetic" if cfg.data.synthetic else d.files),
                     seed=cfg.train.seed, top_k=d.top_k)
        print(f"[distill] teacher top-{k} logits of {done} samples -> {out}")
    return done
