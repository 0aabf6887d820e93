"""The frozen teacher: inference only, at its own tensor-parallel size, answering "top-k logits of these tokens".

    teacher = Teacher.load("runs/big/final_model", tp_size=2)        # every rank calls it (collective at TP > 1)
    values, indices = teacher.topk(input_ids, document_ids, k=64)    # this rank's micro-batch, [b, s, k] each

The teacher and the student do not share a layout (a 70B teacher at TP 8 next to an 8B student at TP 1 x DP 8):
the teacher's TP groups are consecutive blocks of ``tp_size`` global ranks, made here (not megatron's global
``parallel_state``, which belongs to the student). Within a teacher group the ranks hold different student
micro-batches, so ``topk`` all-gathers the group's inputs, runs one forward over all of them with vocabulary-
parallel logits, merges the per-rank top-k (``rlhf.distill.losses.teacher_topk``) and keeps this rank's rows: the
full logits are never gathered, and no gradient or optimizer state exists for the teacher. Its weights are read
slice by slice (``open_checkpoint``), so each rank holds 1/tp of them, in ``dtype``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model import comm
from model.llama import Llama
from model.materialize import build_unfilled
from rlhf.distill.losses import teacher_topk


def teacher_layers(tp_size: int, *, dtype: torch.dtype) -> tuple[Any, Any, int]:
    """``(LayerFactory, group, tp_rank)`` for blocks of ``tp_size`` consecutive global ranks (collective)."""
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig

    from model.parallel import MegatronLayers

    world, rank = comm.world_size(), comm.rank()
    if world % tp_size:
        raise ValueError(f"distill.teacher_tp={tp_size} does not divide the {world} ranks of the run")
    group = None
    for start in range(0, world, tp_size):  # every rank creates every group (torch.distributed's rule)
        ranks = list(range(start, start + tp_size))
        made = dist.new_group(ranks)
        if rank in ranks:
            group = made
    layers = MegatronLayers.__new__(MegatronLayers)  # MegatronLayers over our group, not parallel_state's
    layers.group, layers.tp_size, layers.tp_rank = group, tp_size, rank % tp_size
    layers.config = ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                                        perform_initialization=False, params_dtype=dtype)
    return layers, group, rank % tp_size


class Teacher:
    """A frozen ``Llama`` sharded over its own TP group (or whole on every rank at ``tp_size = 1``)."""

    def __init__(self, model: Llama, *, group: Any = None, tp_size: int = 1, tp_rank: int = 0) -> None:
        self.model, self.group, self.tp_size, self.tp_rank = model.eval(), group, tp_size, tp_rank
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    @torch.no_grad()
    def load(cls, checkpoint: str | Path, *, tp_size: int = 1, dtype: torch.dtype = torch.float32) -> Teacher:
        from model.checkpoints import open_checkpoint

        reader = open_checkpoint(checkpoint)
        if tp_size == 1:
            layers, group, tp_rank = None, None, 0
        else:
            layers, group, tp_rank = teacher_layers(tp_size, dtype=dtype)
        # Built on meta, allocated once in ``dtype`` (no default init drawn, no fp32 copy), then every slice read in.
        model = build_unfilled(lambda: Llama(reader.cfg, layers=layers), device="cpu", dtype=dtype)
        for name, param in model.named_parameters():
            dim = getattr(param, "tp_dim", None)
            if dim is None:
                value = reader.read(name)
            else:
                size = param.tp_full_shape[dim] // tp_size
                value = reader.read_slice(name, dim=dim, start=tp_rank * size, stop=(tp_rank + 1) * size)
            param.copy_(value.to(param.dtype))
        return cls(model, group=group, tp_size=tp_size, tp_rank=tp_rank)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.no_grad()
    def topk(self, input_ids: Tensor, document_ids: Tensor | None, *, k: int) -> tuple[Tensor, Tensor]:
        """This rank's ``(values fp32, indices int64)`` ``[b, s, k]`` (collective over the teacher's TP group)."""
        if self.tp_size == 1:
            return teacher_topk(self.model(input_ids, document_ids=document_ids), k)
        tokens = torch.cat(comm.all_gather(input_ids.contiguous(), group=self.group))
        docs = None
        if document_ids is not None:
            docs = torch.cat(comm.all_gather(document_ids.contiguous(), group=self.group))
        logits = self.model(tokens, document_ids=docs)  # [tp * b, s, vocab / tp]
        values, indices = teacher_topk(logits, k, group=self.group, tp_size=self.tp_size, tp_rank=self.tp_rank)
        rows = slice(self.tp_rank * input_ids.shape[0], (self.tp_rank + 1) * input_ids.shape[0])
        return values[rows], indices[rows]
