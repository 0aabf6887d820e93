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

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from model.checkpoints.common import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    NATIVE_WEIGHTS,
    MemoryReader,
    StateDict,
    TensorSource,
    as_state_dict,
    atomic_directory,
    check_state_dict,
    expected_shapes,
    fsync_path,
    load_safetensors,
    read_json,
    tie_output,
    weight_files,
    write_json,
)
from model.checkpoints.streaming import TensorSpec, write_sharded_safetensors
from model.config import LlamaConfig

# Shared helpers stay importable from here (other packages import them from native).
__all__ = ["CONFIG_NAME", "DEFAULT_MAX_SHARD_BYTES", "NATIVE_FORMAT", "NATIVE_WEIGHTS", "StateDict", "TensorSource",
           "as_state_dict", "atomic_directory", "check_state_dict", "expected_shapes", "fsync_path", "is_native_dir",
           "load_native", "load_safetensors", "read_json", "read_native_config", "save_native", "tie_output",
           "write_json", "write_native"]

NATIVE_FORMAT = "llama-native"
NATIVE_FORMAT_VERSION = 1  # single model.safetensors
NATIVE_SHARDED_VERSION = 2  # sharded with model.safetensors.index.json

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
    state_dict = as_state_dict(model_or_state_dict)
    check_state_dict(state_dict, config, source="save_native(state_dict)")
    reader = MemoryReader(config, state_dict, source="save_native(state_dict)")
    return write_native(reader, config, out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def write_native(source: TensorSource, config: LlamaConfig, out_dir: str | Path, *, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Stream ``source`` into a native checkpoint directory (atomically), one tensor in memory at a time.

    ``dtype`` casts every tensor on the way (default: keep each tensor's own).
    """
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
    ckpt_dir = Path(ckpt_dir)
    config = read_native_config(ckpt_dir)
    state_dict: StateDict = {}
    files = weight_files(ckpt_dir)
    for weights in files:
        state_dict.update(load_safetensors(weights))
    state_dict = tie_output(state_dict, config)
    check_state_dict(state_dict, config, source=files[0] if len(files) == 1 else ckpt_dir)
    return config, state_dict
