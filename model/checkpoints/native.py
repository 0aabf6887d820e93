"""Our own checkpoint format, plus the helpers every converter shares (atomic directories, shape checks).

    from model.checkpoints.native import save_native, load_native
    save_native(model, cfg, "out/my-model")              # or a state dict; overwrite=True to replace
    cfg, state_dict = load_native("out/my-model")

A native checkpoint is a directory holding
- ``config.json``: ``LlamaConfig.to_dict()`` plus ``"format": "llama-native", "format_version": 1``;
- ``model.safetensors``: the state dict under our parameter names (``model/llama.py``), half-split RoPE
  layout. With ``tie_embeddings`` only ``tok_embeddings.weight`` is stored (safetensors refuses aliased
  tensors); ``output.weight`` is re-tied on load. Above ``max_shard_bytes`` (default 5 GB) the weights are
  sharded exactly like Hugging Face's: ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  (``"format_version": 2``).

``write_native(reader, cfg, out)`` streams from any ``TensorSource`` (``model/checkpoints/reader.py``,
``train/portable.py``): one tensor in memory at a time.

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
import torch
from torch import Tensor, nn

from model.config import LlamaConfig

NATIVE_FORMAT = "llama-native"
NATIVE_FORMAT_VERSION = 1  # single model.safetensors
NATIVE_SHARDED_VERSION = 2  # sharded with model.safetensors.index.json
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size="5GB"
NATIVE_WEIGHTS = "model.safetensors"
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
# The native format
# ---------------------------------------------------------------------------------------------------
def save_native(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    config: LlamaConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``config.json`` + safetensors to ``out_dir`` atomically; returns ``out_dir``."""
    from model.checkpoints.reader import MemoryReader

    state_dict = as_state_dict(model_or_state_dict)
    check_state_dict(state_dict, config, source="save_native(state_dict)")
    reader = MemoryReader(config, state_dict, source="save_native(state_dict)")
    return write_native(reader, config, out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def write_native(source: TensorSource, config: LlamaConfig, out_dir: str | Path, *, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Stream ``source`` into a native checkpoint directory (atomically), one tensor in memory at a time.

    ``dtype`` casts every tensor on the way (default: keep each tensor's own).
    """
    from model.checkpoints.streaming import TensorSpec, write_sharded_safetensors

    specs = [TensorSpec(s.name, s.shape, dtype or s.dtype) for s in source.specs()
             if not (config.tie_embeddings and s.name == "output.weight")]
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        files = write_sharded_safetensors(tmp, specs, source.read, max_shard_bytes=max_shard_bytes)
        version = NATIVE_FORMAT_VERSION if list(files) == [NATIVE_WEIGHTS] else NATIVE_SHARDED_VERSION
        write_json(tmp / CONFIG_NAME, {**config.to_dict(), "format": NATIVE_FORMAT, "format_version": version})
    return out_dir


def is_native_dir(path: Path) -> bool:
    config = path / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == NATIVE_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def read_native_config(ckpt_dir: Path) -> LlamaConfig:
    """The ``LlamaConfig`` of a native checkpoint directory (errors name config.json and the field)."""
    config_path = Path(ckpt_dir) / CONFIG_NAME
    data = read_json(config_path)
    fmt, version = data.pop("format", None), data.pop("format_version", None)
    if fmt != NATIVE_FORMAT:
        raise ValueError(f"{config_path}: \"format\" is {fmt!r}, expected {NATIVE_FORMAT!r} (not a native checkpoint)")
    if version not in (NATIVE_FORMAT_VERSION, NATIVE_SHARDED_VERSION):
        raise ValueError(f"{config_path}: \"format_version\" is {version!r}; this code reads versions "
                         f"{NATIVE_FORMAT_VERSION} and {NATIVE_SHARDED_VERSION}")
    try:
        return LlamaConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: not a valid model config: {err}") from err


def load_native(ckpt_dir: str | Path) -> tuple[LlamaConfig, StateDict]:
    """Read a native checkpoint directory: ``(config, state_dict)`` with tied weights re-tied."""
    from model.checkpoints.reader import weight_files

    ckpt_dir = Path(ckpt_dir)
    config = read_native_config(ckpt_dir)
    state_dict: StateDict = {}
    files = weight_files(ckpt_dir)
    for weights in files:
        state_dict.update(load_safetensors(weights))
    state_dict = tie_output(state_dict, config)
    check_state_dict(state_dict, config, source=files[0] if len(files) == 1 else ckpt_dir)
    return config, state_dict
