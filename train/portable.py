"""Layout-independent checkpoint files: fp32 weights and Adam moments by plain-model parameter name.

    CHECKPOINT/portable/tp01-pp00.safetensors   one file per (TP rank, PP stage), written by DP rank 0
        "param/layers.0.attention.wq.weight", "exp_avg/...", "exp_avg_sq/..."   (this TP rank's slice)
        metadata: {"tp_dims": {name: dim | null}, "tp_rank", "pp_rank", "adam_step", "layout"}

    reader = PortableCheckpoint(CHECKPOINT)
    reader.full("layers.0.attention.wq.weight", "param")   # whole tensor: TP slices concatenated
    reader.full_state_dict()                                # every weight, whole (consolidation)

A parameter split over TP (``tp_dim`` set) is rebuilt by concatenating the TP ranks' slices along that
dimension; a parameter whole on every rank (norms, replicated kv projections) is read from TP rank 0.
Files are safetensors (no pickle), written to a temporary name and renamed, inside a checkpoint directory
that itself is only published when complete (``train/checkpointing.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

DIRNAME = "portable"
KEYS = ("param", "exp_avg", "exp_avg_sq")


def rank_file(checkpoint_dir: Path, *, tp_rank: int, pp_rank: int) -> Path:
    return Path(checkpoint_dir) / DIRNAME / f"tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def write_rank_file(checkpoint_dir: Path, *, tensors: dict[str, dict[str, Any]], tp_rank: int, pp_rank: int,
                    adam_step: int, layout: dict[str, Any]) -> Path:
    """Write one (TP rank, PP stage)'s slice; ``tensors[name] = {"param", "exp_avg", "exp_avg_sq", "tp_dim"}``."""
    path = rank_file(checkpoint_dir, tp_rank=tp_rank, pp_rank=pp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{key}/{name}": entry[key].contiguous() for name, entry in tensors.items() for key in KEYS}
    meta = {"tp_dims": {name: entry["tp_dim"] for name, entry in tensors.items()}, "tp_rank": tp_rank,
            "pp_rank": pp_rank, "adam_step": adam_step, "layout": layout}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(flat, str(tmp), metadata={"portable": json.dumps(meta)})
    os.replace(tmp, path)
    return path


class PortableCheckpoint:
    """Reads the portable files of one checkpoint directory (see the module docstring)."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.dir = Path(checkpoint_dir)
        files = sorted((self.dir / DIRNAME).glob("tp*-pp*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.dir}: no {DIRNAME}/tp*-pp*.safetensors files; the checkpoint was "
                                    "written without its portable copy and cannot be re-sharded or consolidated")
        self._where: dict[str, list[tuple[int, Path]]] = {}
        self._dims: dict[str, int | None] = {}
        self.adam_step = 0
        self.layout: dict[str, Any] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()["portable"])
            self.adam_step, self.layout = int(meta["adam_step"]), meta["layout"]
            for name, dim in meta["tp_dims"].items():
                self._where.setdefault(name, []).append((int(meta["tp_rank"]), path))
                self._dims[name] = dim
        expected_tp = int(self.layout.get("tp", 1))
        for name, places in self._where.items():
            if len(places) != expected_tp:
                raise ValueError(f"{self.dir}/{DIRNAME}: {name} is in {len(places)} file(s) but the checkpoint was "
                                 f"saved at tp={expected_tp}; the checkpoint is incomplete")
        meta_file = self.dir / "meta.json"
        self.meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}

    def names(self) -> list[str]:
        return sorted(self._where)

    def full(self, name: str, key: str = "param") -> Tensor:
        """The whole tensor of ``key`` ("param", "exp_avg", "exp_avg_sq") for parameter ``name``."""
        if name not in self._where:
            raise KeyError(f"{self.dir}: parameter {name!r} is not in the checkpoint (model shapes differ?)")
        places = sorted(self._where[name])
        dim = self._dims[name]
        pieces = []
        for _, path in places if dim is not None else places[:1]:
            with safe_open(str(path), framework="pt") as fh:
                pieces.append(fh.get_tensor(f"{key}/{name}"))
        return torch.cat(pieces, dim=dim) if dim is not None else pieces[0]

    def full_state_dict(self) -> dict[str, Tensor]:
        return {name: self.full(name, "param") for name in self.names()}
