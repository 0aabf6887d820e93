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

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from model.checkpoints.native import CONFIG_NAME, NATIVE_WEIGHTS, expected_shapes, read_json
from model.checkpoints.streaming import SAFE_INDEX, SafetensorsFile, TensorSpec
from model.config import LlamaConfig


class WeightReader:
    """Tensors by our parameter names; subclasses say where the bytes come from."""

    def __init__(self, cfg: LlamaConfig, specs: Mapping[str, TensorSpec], *, source: str | Path) -> None:
        self.cfg, self.source = cfg, str(source)
        self._specs = dict(specs)
        check_specs(self._specs, cfg, source=source)

    def names(self) -> list[str]:
        """Every tensor of ``Llama(cfg)`` in model order (``output.weight`` too, tied or not)."""
        return list(expected_shapes(self.cfg))

    def spec(self, name: str) -> TensorSpec:
        return self._specs[self._stored(name)]

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, self.spec(n).shape, self.spec(n).dtype) for n in self.names()]

    def _stored(self, name: str) -> str:
        if self.cfg.tie_embeddings and name == "output.weight":
            return "tok_embeddings.weight"  # some exports store the tied head too; the embedding rules
        if name not in self._specs:
            raise KeyError(f"{self.source}: no tensor {name!r} in this checkpoint")
        return name

    def read(self, name: str) -> Tensor:
        raise NotImplementedError

    def read_slice(self, name: str, *, dim: int, start: int, stop: int) -> Tensor:
        """Rows/columns ``start:stop`` of ``dim``; this base class reads the whole tensor and narrows it."""
        return self.read(name).narrow(dim, start, stop - start).clone()


class MemoryReader(WeightReader):
    """Serves an in-memory state dict (formats without an index, and tests)."""

    def __init__(self, cfg: LlamaConfig, state_dict: Mapping[str, Tensor], *, source: str | Path) -> None:
        self._tensors = dict(state_dict)
        super().__init__(cfg, {n: TensorSpec(n, tuple(t.shape), t.dtype) for n, t in self._tensors.items()},
                         source=source)

    def read(self, name: str) -> Tensor:
        return self._tensors[self._stored(name)]


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


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those the index names, else ``model.safetensors``."""
    index = directory / SAFE_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: \"weight_map\" is missing or empty")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing[:3]}")
        return files
    single = directory / NATIVE_WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"{directory}: no weights found (looked for {SAFE_INDEX} and {NATIVE_WEIGHTS})")
    return [single]


def check_specs(specs: Mapping[str, TensorSpec], cfg: LlamaConfig, *, source: str | Path) -> None:
    """Every tensor of the config present with its shape (``output.weight`` may be absent when tied)."""
    from model.checkpoints.native import check_state_dict

    class _Shaped:  # check_state_dict only reads .shape
        def __init__(self, shape: tuple[int, ...]) -> None:
            self.shape = shape

    shaped: dict[str, Any] = {n: _Shaped(s.shape) for n, s in specs.items()}
    if cfg.tie_embeddings and "output.weight" not in shaped and "tok_embeddings.weight" in shaped:
        shaped["output.weight"] = shaped["tok_embeddings.weight"]
    check_state_dict(shaped, cfg, source=source)


def open_checkpoint(path: str | Path, *, format: str | None = None) -> WeightReader:
    """A reader for any supported checkpoint (native and HF lazily and slice-wise, the others from memory)."""
    from model.checkpoints import detect_format, load_checkpoint

    fmt = format or detect_format(path)
    if fmt == "native":
        from model.checkpoints.native import read_native_config

        return SafetensorsReader(path, read_native_config(Path(path)))
    if fmt == "hf":
        from model.checkpoints import hf

        directory = hf._resolve(path)
        if (directory / SAFE_INDEX).is_file() or (directory / NATIVE_WEIGHTS).is_file():
            config_path = directory / CONFIG_NAME
            cfg = hf.llama_config_from_hf(read_json(config_path), source=config_path)
            return SafetensorsReader(directory, cfg, from_file_name=lambda n: hf.native_name(n, source=directory),
                                     ignore=lambda n: bool(hf._IGNORED_HF.search(n)))
    cfg, state_dict = load_checkpoint(path, format=fmt)  # type: ignore[arg-type]
    return MemoryReader(cfg, state_dict, source=path)
