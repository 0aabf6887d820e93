"""Layout-independent checkpoint files: fp32 weights and Adam moments by plain-model parameter name, per rank.

    CHECKPOINT/portable/tp01-pp00-dp003.safetensors      one file per rank: its ZeRO fragment of its TP slice
        "param/layers.0.attention.wq.weight", "exp_avg/...", "exp_avg_sq/..."   1-D: elements start:stop of the
                                                          flattened TP slice this rank owns
        metadata "portable": {"format_version": 2, "tensors": {name: {"tp_dim", "tp_shape", "full_shape",
                              "start", "stop"}}, "tp_rank", "pp_rank", "dp_rank", "adam_step", "layout"}

    reader = PortableCheckpoint(CHECKPOINT)
    reader.read_slice("output.weight", "param", dim=0, start=0, stop=16000)   # a target rank's rows only
    reader.full("layers.0.attention.wq.weight", "param")                       # whole tensor (consolidation)
    write_native(reader.source(), cfg, out)                                    # stream any saved layout out

Each rank writes only what it owns (its TP slice of its pipeline stage, cut to its ZeRO partition), so no
rank ever holds more than its shard to save. A tensor is rebuilt by placing every TP rank's slice along
``tp_dim`` (Megatron's ``chunk`` split) and, inside a slice, every DP rank's flat ``[start, stop)`` fragment.
Reads are plain ``pread``s (``SafetensorsFile``) of only the fragments that overlap the requested region: a
row range of a TP slice is one flat range; a column range is read in blocks of rows.

Version 1 files (``tp01-pp00.safetensors``, written by DP rank 0 with whole TP slices) are still read.
Files are safetensors (no pickle); the checkpoint directory is published only when complete
(``train/checkpointing.py``), and ``meta.json`` records every file's size and SHA-256.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoints.streaming import FileRecord, SafetensorsFile, TensorSpec, write_safetensors

DIRNAME = "portable"
KEYS = ("param", "exp_avg", "exp_avg_sq")
FORMAT_VERSION = 2
_FILE = re.compile(r"^tp(\d+)-pp(\d+)(?:-dp(\d+))?\.safetensors$")
_ROW_BLOCK_ELEMENTS = 1 << 22  # column slices are copied out 16 MiB (fp32) of source rows at a time


def rank_file(checkpoint_dir: Path, *, tp_rank: int, pp_rank: int, dp_rank: int) -> Path:
    return Path(checkpoint_dir) / DIRNAME / f"tp{tp_rank:02d}-pp{pp_rank:02d}-dp{dp_rank:03d}.safetensors"


def tp_range(length: int, *, rank: int, size: int) -> tuple[int, int]:
    """``[start, stop)`` of TP rank ``rank``'s slice along a dimension of ``length`` (``Tensor.chunk``'s split)."""
    step = -(-length // size)
    start = min(rank * step, length)
    return start, min(start + step, length)


@dataclass
class Fragment:
    """One rank's elements ``[start, stop)`` of the flattened TP slice ``tp_shape`` of one parameter."""

    name: str
    param: Tensor
    exp_avg: Tensor | None  # None: weights only (exports)
    exp_avg_sq: Tensor | None
    tp_dim: int | None
    tp_shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.param.numel()


def write_rank_fragments(checkpoint_dir: Path, fragments: list[Fragment], *, tp_rank: int, pp_rank: int,
                         dp_rank: int, adam_step: int, layout: dict[str, Any]) -> tuple[Path, FileRecord]:
    """Write this rank's file, streaming one tensor at a time; returns its path and size/SHA-256."""
    path = rank_file(checkpoint_dir, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_name = {f.name: f for f in fragments}
    specs = [TensorSpec(f"{key}/{f.name}", (f.param.numel(),), torch.float32) for f in fragments for key in KEYS
             if getattr(f, key) is not None]
    tensors = {f.name: {"tp_dim": f.tp_dim, "tp_shape": list(f.tp_shape), "full_shape": list(f.full_shape),
                        "start": f.start, "stop": f.stop} for f in fragments}
    meta = {"format_version": FORMAT_VERSION, "tensors": tensors, "tp_rank": tp_rank, "pp_rank": pp_rank,
            "dp_rank": dp_rank, "adam_step": adam_step, "layout": layout}

    def fetch(key_name: str) -> Tensor:
        key, name = key_name.split("/", 1)
        return getattr(by_name[name], key).reshape(-1)

    record = write_safetensors(path, specs, fetch, metadata={"portable": json.dumps(meta)})
    return path, record


def write_rank_file(checkpoint_dir: Path, *, tensors: dict[str, dict[str, Any]], tp_rank: int, pp_rank: int,
                    adam_step: int, layout: dict[str, Any]) -> Path:
    """Whole TP slices from DP rank 0 (``tensors[name] = {"param", "exp_avg", "exp_avg_sq", "tp_dim"}``), as
    one fragment per tensor. Kept for engines that gather over DP before saving."""
    tp = int(layout.get("tp", 1))
    fragments = []
    for name, entry in tensors.items():
        param, dim = entry["param"], entry["tp_dim"]
        full = list(param.shape)
        if dim is not None:
            full[dim] *= tp
        fragments.append(Fragment(name, param.reshape(-1), entry["exp_avg"].reshape(-1),
                                  entry["exp_avg_sq"].reshape(-1), dim, tuple(param.shape), tuple(full), 0))
    path, _ = write_rank_fragments(checkpoint_dir, fragments, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=0,
                                   adam_step=adam_step, layout=layout)
    return path


@dataclass(frozen=True)
class _Piece:
    path: Path
    tp_rank: int
    start: int
    stop: int


class PortableCheckpoint:
    """Reads the portable files of one checkpoint directory (see the module docstring)."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.dir = Path(checkpoint_dir)
        files = sorted(p for p in (self.dir / DIRNAME).glob("tp*-pp*.safetensors") if _FILE.match(p.name))
        if not files:
            raise FileNotFoundError(f"{self.dir}: no {DIRNAME}/tp*-pp*.safetensors files; the checkpoint was "
                                    "written without its portable copy and cannot be re-sharded or consolidated")
        self._pieces: dict[str, dict[int, list[_Piece]]] = {}
        self._info: dict[str, dict[str, Any]] = {}
        self._tp_shapes: dict[str, dict[int, list[int]]] = {}
        self._files: dict[Path, SafetensorsFile] = {}
        self.adam_step = 0
        self.layout: dict[str, Any] = {}
        for path in files:
            self._index(path)
        self._check_complete()
        meta_file = self.dir / "meta.json"
        from train.checkpoint_files import read_json_file

        self.meta: dict[str, Any] = read_json_file(meta_file) if meta_file.is_file() else {}

    # ---- index -------------------------------------------------------------------------------------
    def _index(self, path: Path) -> None:
        try:
            fh = SafetensorsFile(path)
            meta = json.loads(fh.metadata["portable"])
            shapes = {} if "tensors" in meta else {k.split("/", 1)[1]: fh.shape(k)
                                                   for k in fh.keys() if k.startswith("param/")}
        except (ValueError, KeyError) as err:  # a truncated header, a missing metadata key
            raise ValueError(f"{path}: not a readable portable checkpoint file ({type(err).__name__}: {err})") \
                from err
        self._files[path] = fh
        self.adam_step, self.layout = int(meta["adam_step"]), meta["layout"]
        tp_rank = int(meta["tp_rank"])
        if "tensors" in meta:  # version 2: fragments
            entries = meta["tensors"]
        else:  # version 1: whole TP slices, tp_dims only
            tp = int(meta["layout"].get("tp", 1))
            entries = {}
            for name, dim in meta["tp_dims"].items():
                shape = list(shapes[name])
                full = list(shape)
                if dim is not None:
                    full[dim] *= tp
                entries[name] = {"tp_dim": dim, "tp_shape": shape, "full_shape": full, "start": 0,
                                 "stop": _numel(shape)}
        for name, info in entries.items():
            self._info.setdefault(name, info)
            self._tp_shapes.setdefault(name, {})[tp_rank] = list(info["tp_shape"])
            piece = _Piece(path, tp_rank, int(info["start"]), int(info["stop"]))
            self._pieces.setdefault(name, {}).setdefault(tp_rank, []).append(piece)

    def _check_complete(self) -> None:
        """Every TP slice of every parameter covered by fragments without gaps (else: which file is missing)."""
        expected_tp = int(self.layout.get("tp", 1))
        for name, by_tp in self._pieces.items():
            if sorted(by_tp) != list(range(expected_tp)):
                raise ValueError(f"{self.dir}/{DIRNAME}: {name} is in TP rank(s) {sorted(by_tp)} but the checkpoint "
                                 f"was saved at tp={expected_tp}; the checkpoint is incomplete")
            for tp_rank, pieces in by_tp.items():
                pieces.sort(key=lambda p: p.start)
                end = 0
                for piece in pieces:
                    if piece.start != end:
                        raise ValueError(f"{self.dir}/{DIRNAME}: elements {end}:{piece.start} of {name} (TP rank "
                                         f"{tp_rank}) are in no file; a rank's file is missing")
                    end = piece.stop
                size = _numel(self._tp_shapes[name][tp_rank])
                if end != size:
                    raise ValueError(f"{self.dir}/{DIRNAME}: {name} (TP rank {tp_rank}) ends at element {end} of "
                                     f"{size}; a rank's file is missing")

    # ---- queries -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._pieces)

    def tp_dim(self, name: str) -> int | None:
        return self._require(name)["tp_dim"]

    def full_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._require(name)["full_shape"])

    def _require(self, name: str) -> dict[str, Any]:
        if name not in self._info:
            raise KeyError(f"{self.dir}: parameter {name!r} is not in the checkpoint (model shapes differ?)")
        return self._info[name]

    # ---- reads -------------------------------------------------------------------------------------
    def full(self, name: str, key: str = "param") -> Tensor:
        """The whole tensor of ``key`` ("param", "exp_avg", "exp_avg_sq") for parameter ``name``."""
        return self.read_slice(name, key, dim=0, start=0, stop=self.full_shape(name)[0])

    def read_slice(self, name: str, key: str = "param", *, dim: int, start: int, stop: int) -> Tensor:
        """``full(name, key)`` narrowed to ``start:stop`` along ``dim``, reading only what overlaps it."""
        info = self._require(name)
        full_shape = tuple(info["full_shape"])
        out_shape = list(full_shape)
        out_shape[dim] = stop - start
        out = torch.empty(out_shape, dtype=torch.float32)
        tp_dim = info["tp_dim"]
        sources = sorted(self._pieces[name]) if tp_dim is not None else [0]
        for tp_rank in sources:
            src_shape = self._tp_shapes[name][tp_rank]
            offset = 0
            if tp_dim is not None:
                offset, _ = tp_range(full_shape[tp_dim], rank=tp_rank, size=len(sources))
            # this source slice covers [offset, offset + src_shape[dim]) of the full tensor along ``dim``
            lo, hi = (offset, offset + src_shape[dim]) if dim == tp_dim else (0, full_shape[dim])
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            target = out.narrow(dim, a - start, b - a)
            if tp_dim is not None and dim != tp_dim:  # the slice sits at its TP offset in the other dim
                target = target.narrow(tp_dim, offset, src_shape[tp_dim])
            self._copy_region(name, key, tp_rank, src_shape, dim=dim, start=a - lo, stop=b - lo, into=target)
        return out

    def _copy_region(self, name: str, key: str, tp_rank: int, shape: list[int], *, dim: int, start: int,
                     stop: int, into: Tensor) -> None:
        """Copy ``slice[start:stop]`` along ``dim`` of one TP slice (shape ``shape``) into ``into``."""
        inner = _numel(shape[dim + 1:])
        outer = _numel(shape[:dim])
        if outer == 1:  # rows of a contiguous block: one flat range, read straight into the output if it can
            if into.is_contiguous():
                self._flat_range(name, key, tp_rank, start * inner, stop * inner, into=into.view(-1))
            else:
                into.copy_(self._flat_range(name, key, tp_rank, start * inner, stop * inner).view(into.shape))
            return
        row = _numel(shape[dim:])  # elements per index of the dims before ``dim``
        block = max(1, _ROW_BLOCK_ELEMENTS // row)
        # ``into`` is a narrow of the output along ``dim``: viewable as (outer, stop - start, inner), not contiguous
        target = into.view(outer, stop - start, inner)
        for first in range(0, outer, block):
            last = min(outer, first + block)
            flat = self._flat_range(name, key, tp_rank, first * row, last * row)
            target[first:last].copy_(flat.view(last - first, shape[dim], inner)[:, start:stop, :])

    def _flat_range(self, name: str, key: str, tp_rank: int, lo: int, hi: int, *,
                    into: Tensor | None = None) -> Tensor:
        """Elements ``[lo, hi)`` of the flattened TP slice, read from the fragments that overlap them."""
        out = torch.empty(hi - lo, dtype=torch.float32) if into is None else into
        for piece in self._pieces[name][tp_rank]:
            a, b = max(lo, piece.start), min(hi, piece.stop)
            if a >= b:
                continue
            # version 1 stores the slice in its own shape: its C-order bytes are the same flat range
            self._files[piece.path].read_flat(f"{key}/{name}", a - piece.start, b - piece.start,
                                              into=out[a - lo:b - lo])
        return out

    def read_tp_fragment(self, name: str, key: str = "param", *, tp_dim: int | None, start: int, stop: int,
                         tp_size: int, lo: int, hi: int) -> Tensor:
        """Elements ``lo:hi`` of a target rank's flattened TP slice (``start:stop`` along ``tp_dim``; the whole
        tensor when ``tp_dim`` is None): its ZeRO fragment. When the source cut the tensor the same way (same TP,
        or an unsplit source and a row range) only the overlapping fragments are read; otherwise one TP slice of
        the tensor is read and cut."""
        info = self._require(name)
        full = tuple(info["full_shape"])
        src_dim, sources = info["tp_dim"], sorted(self._pieces[name])
        inner = _numel(full[1:])
        if src_dim is None and (tp_dim is None or tp_dim == 0):  # the source holds whole tensors
            offset = 0 if tp_dim is None else start * inner
            return self._flat_range(name, key, sources[0], offset + lo, offset + hi)
        if src_dim is not None and tp_dim == src_dim and len(sources) == tp_size:
            for rank in sources:
                if tp_range(full[src_dim], rank=rank, size=tp_size) == (start, stop):
                    return self._flat_range(name, key, rank, lo, hi)
        region = self.full(name, key) if tp_dim is None else self.read_slice(name, key, dim=tp_dim, start=start,
                                                                             stop=stop)
        return region.reshape(-1)[lo:hi].clone()

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every weight, whole (small models and tests; use ``source()`` to stream large ones)."""
        return {name: self.full(name, "param") for name in self.names()}

    def source(self, model_cfg: Any) -> PortableSource:
        """A ``TensorSource`` over the fp32 weights in ``model_cfg``'s order, for the streaming writers."""
        return PortableSource(self, model_cfg)

    def specs(self, names: list[str] | None = None) -> list[TensorSpec]:
        """Every stored weight (or ``names``) as fp32 specs, for writers of formats beyond the plain Llama."""
        return [TensorSpec(n, self.full_shape(n), torch.float32) for n in (names or self.names())]


class StateDictExport:
    """An in-memory state dict behind ``PortableCheckpoint``'s export interface (one-process engines, tests)."""

    def __init__(self, state_dict: dict[str, Tensor]) -> None:
        self._tensors = state_dict

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def full(self, name: str, key: str = "param") -> Tensor:
        return self._tensors[name].float()

    def specs(self, names: list[str] | None = None) -> list[TensorSpec]:
        return [TensorSpec(n, self.full_shape(n), torch.float32) for n in (names or self.names())]

    def source(self, model_cfg: Any) -> PortableSource:
        return PortableSource(self, model_cfg)  # type: ignore[arg-type]


class PortableSource:
    """The weights of a portable checkpoint as a ``TensorSource``: one whole tensor per ``read``."""

    def __init__(self, reader: PortableCheckpoint, model_cfg: Any) -> None:
        from model.checkpoints.native import expected_shapes

        self.reader, self.cfg = reader, model_cfg
        self._shapes = expected_shapes(model_cfg)
        stored = set(reader.names())
        missing = [n for n in self._shapes if n not in stored and not self._tied(n)]
        if missing:
            raise ValueError(f"{reader.dir}: the portable files lack {missing[:5]}; the checkpoint does not match "
                             f"its model config ({model_cfg.name})")

    def _tied(self, name: str) -> bool:
        return self.cfg.tie_embeddings and name == "output.weight" and name not in self.reader.names()

    def names(self) -> list[str]:
        return list(self._shapes)

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, tuple(s), torch.float32) for n, s in self._shapes.items()]

    def read(self, name: str) -> Tensor:
        return self.reader.full("tok_embeddings.weight" if self._tied(name) else name, "param")


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
