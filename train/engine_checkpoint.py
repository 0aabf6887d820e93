"""The engine's checkpoint I/O: each rank saves, restores and exports only its shard (no gather, no pickle).

    io = EngineCheckpoint(engine)
    write = io.stage(checkpoint_dir, client_state)   # copies this rank's fragments to host memory (the stall)
    records = write()                                 # writes them (background thread when saving async)
    io.load(checkpoint_dir)                           # any saved layout: reads this rank's slices only
    io.load_weights(reader)                           # initial weights (SFT/RM/PPO init): this rank's slices only
    with io.exported(out_dir) as source: ...          # rank 0 streams the whole model from every rank's files

Format choice (see docs/TRAIN_INTERFACES.md, "Checkpoints"): our own per-rank safetensors fragments
(``train/portable.py``) rather than torch.distributed.checkpoint or DeepSpeed's universal checkpoint:
- DCP writes its global plan as a pickled ``.metadata`` file (read with ``pickle.load``) and DeepSpeed's own
  checkpoints are ``torch.save`` pickles that it reads with ``weights_only=False``; ours are safetensors + JSON,
  so a checkpoint from someone else cannot run code;
- DeepSpeed's universal checkpoint needs an offline conversion pass (``ds_to_universal``) that loads every
  rank's pickles; ours is layout-independent as written: any TP x PP x DP layout reads any other's slices;
- ``train.consolidate`` and the exports read the same files in a plain process (no launcher, no DeepSpeed).
The files hold the fp32 master weights and Adam moments of each rank's ZeRO fragment, whose location inside
the full tensor (TP dimension and range, flat fragment range) is in the file's metadata.

Memory: a save copies the rank's fragments (its optimizer-state shard) once; a load or an initialisation reads
one TP slice of one tensor at a time (or, at the same TP layout, just the fragment); an export writes the
fragments and rank 0 streams one tensor at a time from them (``write_native``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model import comm
from model.checkpoints.streaming import FileRecord
from train.portable import Fragment, PortableCheckpoint, tp_range, write_rank_fragments
from train.sharded_state import (
    ADAM_MOMENTS,
    assign_parameter,
    fragment_range,
    parameter_shape,
    read_fragment,
    write_fragment,
)

ENGINE_STATE = "layout.json"


class EngineCheckpoint:
    """Checkpoint I/O of one ``TrainEngine`` (uses its ``ds``, ``module``, ``topo``, ``native_name``, ``layout``)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    # ---- what this rank holds ----------------------------------------------------------------------
    def _params(self, module: Any) -> list[tuple[str, Any]]:
        seen: set[int] = set()
        out = []
        for name, param in module.named_parameters():
            if id(param) not in seen:  # tied weights are listed once
                seen.add(id(param))
                out.append((self.engine.native_name(name), param))
        return out

    def _tp_region(self, param: Any) -> tuple[int | None, int, int]:
        """``(tp_dim, start, stop)`` of this rank's TP slice along ``tp_dim`` (None: the whole tensor)."""
        dim = getattr(param, "tp_dim", None)
        if dim is None:
            return None, 0, 0
        full = tuple(param.tp_full_shape)
        start, stop = tp_range(full[dim], rank=self.engine.topo.tp_rank, size=self.engine.topo.tp_size)
        return dim, start, stop

    # ---- save --------------------------------------------------------------------------------------
    def stage(self, checkpoint_dir: Path, client_state: dict[str, Any] | None = None, *,
              moments: bool = True) -> Callable[[], dict[str, FileRecord]]:
        """Copy this rank's fragments to host memory now; return the function that writes them."""
        engine = self.engine
        ds = engine._engine()
        adam_step = engine._adam_step()
        if adam_step > 0:
            engine._link_optimizer_state()
        fragments = []
        first_dp = engine.topo.dp_rank == 0
        for native, param in self._params(ds.module):
            span = fragment_range(param)
            if not param.requires_grad:
                # Frozen weights (LoRA's base) are in no optimizer and no training checkpoint, but an export needs
                # them: ZeRO-3 partitions them like the rest (each rank writes its partition of the module weight);
                # at ZeRO-1/2 each TP slice is whole on every DP rank, written once by DP rank 0 as one fragment.
                if moments or (span is None and not first_dp):
                    continue
                if span is None:
                    span, master = (0, param.numel()), param.detach().float().cpu().reshape(-1).clone()
                else:
                    master = param.ds_tensor.detach().float().cpu().reshape(-1)[: span[1] - span[0]].clone()
            elif span is None:
                continue
            else:
                master = read_fragment(param)
            state = [read_fragment(param, k) if moments and adam_step > 0 else None for k in ADAM_MOMENTS]
            if moments:
                state = [s if s is not None else torch.zeros_like(master) for s in state]
            tp_shape = tuple(getattr(param, "ds_shape", param.shape))
            full_shape = tuple(getattr(param, "tp_full_shape", tp_shape))
            fragments.append(Fragment(native, master, state[0], state[1], getattr(param, "tp_dim", None), tp_shape,
                                      full_shape, span[0]))
        topo, layout = engine.topo, engine.layout()
        engine_state = {**layout, "global_steps": int(ds.global_steps), "skipped_steps": int(ds.skipped_steps),
                        "adam_step": adam_step}
        # ZeRO partitions span DP x CP (context-parallel ranks hold the same weights): one file per partition,
        # so a checkpoint written at CP 2 reads like one of DP 2 and resumes at any CP.
        dp_rank = getattr(topo, "dp_cp_rank", topo.dp_rank) if engine.engine_cfg.zero.stage >= 1 else 0
        checkpoint_dir = Path(checkpoint_dir)

        def write() -> dict[str, FileRecord]:
            path, record = write_rank_fragments(checkpoint_dir, fragments, tp_rank=topo.tp_rank, pp_rank=topo.pp_rank,
                                                dp_rank=dp_rank, adam_step=adam_step, layout=layout)
            records = {str(path.relative_to(checkpoint_dir)): record}
            if topo.global_rank == 0:
                from model.checkpoints.streaming import hash_file

                (checkpoint_dir / ENGINE_STATE).write_text(json.dumps(engine_state, indent=2) + "\n")
                records[ENGINE_STATE] = hash_file(checkpoint_dir / ENGINE_STATE)
            return records

        return write

    # ---- load --------------------------------------------------------------------------------------
    @torch.no_grad()
    def load(self, checkpoint_dir: Path) -> dict[str, Any]:
        """Restore weights, master weights, Adam moments and counters from any saved layout (before step 1)."""
        engine = self.engine
        if engine.ds is not None:
            raise RuntimeError("a checkpoint load must come before the first step (the DeepSpeed engine exists)")
        reader = PortableCheckpoint(checkpoint_dir)
        self.fill_module(lambda name, dim, start, stop: reader.read_slice(name, "param", dim=dim, start=start,
                                                                          stop=stop) if dim is not None
                         else reader.full(name, "param"), names=set(reader.names()), source=str(checkpoint_dir))
        engine._weights_filled = True  # no seeded init over them when the DeepSpeed engine is built
        ds = engine._engine()
        engine._create_optimizer_state()
        engine._link_optimizer_state()
        tp_size = engine.topo.tp_size
        for native, param in self._params(ds.module):
            span = fragment_range(param)
            if span is None or not param.requires_grad:  # frozen (LoRA's base): filled above from the initial weights
                continue
            dim, start, stop = self._tp_region(param)
            for key in (None, *ADAM_MOMENTS):
                value = reader.read_tp_fragment(native, key or "param", tp_dim=dim, start=start, stop=stop,
                                                tp_size=tp_size, lo=span[0], hi=span[1])
                write_fragment(param, value, key)
        engine._set_adam_step(reader.adam_step)
        saved = _read_engine_state(Path(checkpoint_dir))
        ds.global_steps = int(saved.get("global_steps", reader.meta.get("step", reader.adam_step)))
        ds.skipped_steps = int(saved.get("skipped_steps", 0))
        return {}  # the loop's counters come from meta.json, which every checkpoint holds

    @torch.no_grad()
    def fill_module(self, read: Callable[[str, int | None, int, int], Tensor], *, names: set[str], source: str,
                    strict: bool = True) -> list[str]:
        """Fill the plain module's parameters (before DeepSpeed) from ``read(name, tp_dim, start, stop)``: this
        rank's TP slice of one tensor at a time. Returns the names ``source`` lacks (kept as initialised)."""
        missing = []
        for native, param in self._params(self.engine.module):
            if native not in names:
                if param.requires_grad:  # frozen weights (LoRA's base) are never in a training checkpoint
                    missing.append(native)
                continue
            dim, start, stop = self._tp_region(param)
            value = read(native, dim, start, stop)
            shape = parameter_shape(param)
            if tuple(value.shape) != shape:
                raise ValueError(f"{source}: {native} gives shape {tuple(value.shape)} for this rank, the model "
                                 f"expects {shape} (full {tuple(getattr(param, 'tp_full_shape', ()))});"
                                 " the checkpoint is for another model config")
            assign_parameter(param, value.to(param.dtype))  # ZeRO-3: only this rank's partition of it
            del value
        if strict and missing:
            raise KeyError(f"{source}: lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return missing

    def load_weights(self, reader: Any) -> list[str]:
        """Initial weights from a ``WeightReader`` (``model.checkpoints.open_checkpoint``): slices only."""
        def read(name: str, dim: int | None, start: int, stop: int) -> Tensor:
            return reader.read(name) if dim is None else reader.read_slice(name, dim=dim, start=start, stop=stop)

        names = set(reader.names())
        return self.fill_module(read, names=names, source=str(getattr(reader, "source", "initial weights")),
                                strict=False)

    # ---- export ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def exported(self, out_dir: Path) -> Iterator[PortableCheckpoint | None]:
        """Collective. Every rank writes its fp32 weight fragments next to ``out_dir``; rank 0 gets a reader over
        them (None elsewhere) to stream the whole model from, one tensor at a time; removed on exit."""
        topo = self.engine.topo
        nonce = comm.broadcast_object(secrets.token_hex(4) if topo.global_rank == 0 else None)
        scratch = Path(out_dir).parent / f".export-{Path(out_dir).name}-{nonce}"
        try:
            self.stage(scratch, moments=False)()
            comm.barrier()
            yield PortableCheckpoint(scratch) if topo.global_rank == 0 else None
            comm.barrier()
        finally:
            if topo.global_rank == 0:
                shutil.rmtree(scratch, ignore_errors=True)


def _read_engine_state(checkpoint_dir: Path) -> dict[str, Any]:
    from train.checkpoint_files import read_json_file

    path = checkpoint_dir / ENGINE_STATE
    return read_json_file(path) if path.is_file() else {}
