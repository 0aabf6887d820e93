"""Read a checkpoint one tensor, or one slice of a tensor, at a time: what sharded loading and streaming export use.

    from model.checkpoints.reader import open_checkpoint
    reader = open_checkpoint("runs/x/final_model")          # native or HF: nothing read yet but the headers
    reader.cfg, reader.names()                               # LlamaConfig, our parameter names in model order
    w = reader.read("layers.0.attention.wq.weight")          # one whole tensor
    rows = reader.read_slice("output.weight", dim=0, start=0, stop=16000)   # a TP rank's rows only

Native and Hugging Face checkpoints are safetensors files (single or sharded with
``model.safetensors.index.json``): the header gives every tensor's byte range, so a row range is one read and
a column range one read per block of rows; a rank that needs 1/8 of a tensor holds 1/8 of it. Meta ``.pth`` and llama2.c
files have no such index; they are loaded whole (``.pth`` memory-mapped) and served from memory.

Every reader is a ``TensorSource`` for the streaming writers (``specs()`` + ``read(name)``), which is how
``convert`` and ``train.consolidate`` write any format from any other with about one tensor in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from model.checkpoints import hf
from model.checkpoints.common import (
    CONFIG_NAME,
    NATIVE_WEIGHTS,
    MemoryReader,
    StateDict,
    WeightReader,
    read_json,
    weight_files,
)
from model.checkpoints.hf import is_hf_dir, load_hf
from model.checkpoints.llama2c import load_llama2c, looks_like_llama2c
from model.checkpoints.meta import is_meta_dir, load_meta
from model.checkpoints.native import is_native_dir, load_native, read_native_config
from model.checkpoints.streaming import SAFE_INDEX, SafetensorsFile, TensorSpec
from model.config import LlamaConfig

Format = Literal["native", "hf", "meta", "llama2c"]
FORMATS: tuple[str, ...] = ("native", "hf", "meta", "llama2c")
__all__ = ["FORMATS", "Format", "MemoryReader", "OverlayReader", "SafetensorsFileReader", "SafetensorsReader",
           "WeightReader", "detect_format", "load_checkpoint", "open_checkpoint"]


class SafetensorsReader(WeightReader):
    """A single or sharded safetensors checkpoint; ``from_file_name`` maps stored names to ours.

    Reads go through ``SafetensorsFile`` (plain ``pread`` of the requested bytes), so a rank's resident memory
    grows by what it asked for, not by the pages a memory map touched.
    """

    def __init__(self, directory: str | Path, cfg: LlamaConfig, *,
                 ignore: Callable[[str], bool] = lambda name: False,
                 from_file_name: Callable[[str], str] = lambda name: name) -> None:
        self.directory = Path(directory)
        self._file_of: dict[str, tuple[SafetensorsFile, str]] = {}
        specs: dict[str, TensorSpec] = {}
        for path in weight_files(self.directory):
            handle = SafetensorsFile(path)
            for stored in handle.keys():
                if ignore(stored):
                    continue
                ours = from_file_name(stored)
                specs[ours] = TensorSpec(ours, handle.shape(stored), handle.dtype(stored))
                self._file_of[ours] = (handle, stored)
        super().__init__(cfg, specs, source=self.directory)

    def read(self, name: str) -> Tensor:
        handle, stored = self._file_of[self._stored(name)]
        return handle.read(stored)

    def read_slice(self, name: str, *, dim: int, start: int, stop: int) -> Tensor:
        handle, stored = self._file_of[self._stored(name)]
        return handle.read_slice(stored, dim=dim, start=start, stop=stop)


def detect_format(path: str | Path) -> Format:
    """Which format ``path`` holds; ValueError/FileNotFoundError saying what was looked for otherwise."""
    p = Path(path)
    if not p.exists():
        if isinstance(path, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            return "hf"  # a hub repo id; load_hf fetches it (or says why it cannot)
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if p.is_dir():
        if is_native_dir(p):
            return "native"
        if is_hf_dir(p):
            return "hf"
        if is_meta_dir(p):
            return "meta"
        raise ValueError(
            f"{p}: not a recognised checkpoint directory: expected config.json with \"format\": "
            "\"llama-native\" (native), config.json with model_type (hf), or params.json + consolidated.NN.pth "
            "(meta)"
        )
    if looks_like_llama2c(p):
        return "llama2c"
    raise ValueError(
        f"{p}: not a recognised checkpoint file: only llama2.c .bin files are single-file checkpoints "
        "(and this file's header/size do not match that format); pass the directory for other formats"
    )


def load_checkpoint(path: str | Path, *, format: Format | None = None) -> tuple[LlamaConfig, StateDict]:
    """``(config, state_dict)`` from any supported format (detected unless given)."""
    fmt = format or detect_format(path)
    if fmt == "native":
        return load_native(path)
    if fmt == "hf":
        return load_hf(path)
    if fmt == "meta":
        return load_meta(path)
    if fmt == "llama2c":
        return load_llama2c(path)
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")


def open_checkpoint(path: str | Path, *, format: str | None = None) -> WeightReader:
    """A reader for any supported checkpoint (native and HF lazily and slice-wise, the others from memory)."""
    fmt = format or detect_format(path)
    if fmt == "native":
        return SafetensorsReader(path, read_native_config(Path(path)))
    if fmt == "hf":
        directory = hf._resolve(path)
        if (directory / SAFE_INDEX).is_file() or (directory / NATIVE_WEIGHTS).is_file():
            config_path = directory / CONFIG_NAME
            cfg = hf.llama_config_from_hf(read_json(config_path), source=config_path)
            return SafetensorsReader(directory, cfg, from_file_name=lambda n: hf.native_name(n, source=directory),
                                     ignore=lambda n: bool(hf._IGNORED_HF.search(n)))
    cfg, state_dict = load_checkpoint(path, format=fmt)  # type: ignore[arg-type]
    return MemoryReader(cfg, state_dict, source=path)


class SafetensorsFileReader:
    """Every tensor of one safetensors file by its stored name (no config): ``names``, ``read``, ``read_slice``.

    For weight files outside the Llama formats (a reward model's backbone + head), read slice-wise like the
    checkpoint readers above.
    """

    def __init__(self, path: str | Path) -> None:
        self.file = SafetensorsFile(path)
        self.source = str(path)

    def names(self) -> list[str]:
        return self.file.keys()

    def read(self, name: str) -> Tensor:
        return self.file.read(name)

    def read_slice(self, name: str, *, dim: int, start: int, stop: int) -> Tensor:
        return self.file.read_slice(name, dim=dim, start=start, stop=stop)


class OverlayReader:
    """A reader with some names dropped and some in-memory tensors added (a value head over a policy)."""

    def __init__(self, base: Any, *, drop: tuple[str, ...] = (), extra: dict[str, Tensor] | None = None) -> None:
        self.base, self.drop, self.extra = base, set(drop), dict(extra or {})
        self.source = getattr(base, "source", "weights")

    def names(self) -> list[str]:
        return [n for n in self.base.names() if n not in self.drop and n not in self.extra] + list(self.extra)

    def read(self, name: str) -> Tensor:
        return self.extra[name] if name in self.extra else self.base.read(name)

    def read_slice(self, name: str, *, dim: int, start: int, stop: int) -> Tensor:
        if name in self.extra:
            return self.extra[name].narrow(dim, start, stop - start)
        return self.base.read_slice(name, dim=dim, start=start, stop=stop)
