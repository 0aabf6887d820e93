"""What every checkpoint converter shares: expected shapes and checks, atomic directories, JSON, tensor sources.

    from model.checkpoints.common import expected_shapes, check_state_dict, atomic_directory, MemoryReader
    check_state_dict(state_dict, cfg, source="my.safetensors")    # ValueError naming the tensor and shape
    with atomic_directory("out/ckpt") as tmp: ...                  # renamed into place only when complete
    reader = MemoryReader(cfg, state_dict, source="memory")        # a TensorSource for the streaming writers

The lowest module of ``model/checkpoints`` besides ``streaming.py``: the format modules (native, hf, meta,
llama2c) and ``reader.py`` build on it, and it imports none of them.

Directories are written atomically: everything goes to ``<out>.tmp-<pid>``, files and the directory are
fsynced, then the directory is renamed into place, so a crash never leaves a half-written checkpoint under
the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
from torch import Tensor, nn

from model.checkpoints.streaming import SAFE_INDEX, SAFE_WEIGHTS, TensorSpec
from model.config import LlamaConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size="5GB"
NATIVE_WEIGHTS = SAFE_WEIGHTS
CONFIG_NAME = "config.json"

StateDict = dict[str, Tensor]


class TensorSource(Protocol):
    """Anything the streaming writers can read from: our names in model order, one tensor per ``read``."""

    def names(self) -> list[str]: ...

    def specs(self) -> list[Any]: ...

    def read(self, name: str) -> Tensor: ...


# ---------------------------------------------------------------------------------------------------
# Shapes and validation (shared by every converter)
# ---------------------------------------------------------------------------------------------------
def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``Llama(cfg).state_dict()`` and its shape, computed without allocating anything."""
    d, kv, ffn = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (cfg.n_heads * cfg.head_dim, d),
            p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d),
            p + "attention.wo.weight": (d, cfg.n_heads * cfg.head_dim),
            p + "ffn_norm.weight": (d,),
            p + "feed_forward.w1.weight": (ffn, d),
            p + "feed_forward.w3.weight": (ffn, d),
            p + "feed_forward.w2.weight": (d, ffn),
        })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (cfg.vocab_size, d)
    return shapes


def check_state_dict(state_dict: Mapping[str, Tensor], cfg: LlamaConfig, *, source: str | Path) -> None:
    """Raise ValueError naming ``source``, the tensor and the expected shape on any mismatch."""
    expected = expected_shapes(cfg)
    missing = [name for name in expected if name not in state_dict]
    if missing:
        name = missing[0]
        raise ValueError(
            f"{source}: tensor {name!r} (expected shape {list(expected[name])}) is missing"
            + (f", and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else "")
            + "; the file is incomplete or is not a checkpoint of this config"
        )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensor(s) {unexpected[:6]} (e.g. shape {list(state_dict[unexpected[0]].shape)}); "
            f"a {cfg.n_layers}-layer Llama has none such, so the checkpoint does not match its config"
        )
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {list(state_dict[name].shape)}, expected {list(shape)} "
                f"for config dim={cfg.dim} n_heads={cfg.n_heads} n_kv_heads={cfg.kv_heads} "
                f"ffn_dim={cfg.ffn_dim} vocab_size={cfg.vocab_size}"
            )


def tie_output(state_dict: StateDict, cfg: LlamaConfig) -> StateDict:
    """With tied embeddings, make ``output.weight`` the very tensor ``tok_embeddings.weight``."""
    if cfg.tie_embeddings and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    return state_dict


def as_state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> StateDict:
    if isinstance(model_or_state_dict, nn.Module):
        return dict(model_or_state_dict.state_dict())
    return dict(model_or_state_dict)


# ---------------------------------------------------------------------------------------------------
# Atomic directory writes
# ---------------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories so that renames and new entries are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out_dir``, on error it is deleted.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then the old directory is moved aside, the
    new one renamed in, and the old one deleted, so ``out_dir`` is always either the old or the new
    checkpoint, never a mixture (between the two renames the name briefly does not exist).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: directory exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an earlier crash of this same pid
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_safetensors(path: Path) -> StateDict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file: {err}") from err


# ---------------------------------------------------------------------------------------------------
# Tensor sources: what the streaming writers read from
# ---------------------------------------------------------------------------------------------------
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
    class _Shaped:  # check_state_dict only reads .shape
        def __init__(self, shape: tuple[int, ...]) -> None:
            self.shape = shape

    shaped: dict[str, Any] = {n: _Shaped(s.shape) for n, s in specs.items()}
    if cfg.tie_embeddings and "output.weight" not in shaped and "tok_embeddings.weight" in shaped:
        shaped["output.weight"] = shaped["tok_embeddings.weight"]
    check_state_dict(shaped, cfg, source=source)
