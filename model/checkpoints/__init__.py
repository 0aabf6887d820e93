"""Checkpoint interchange: one converter module per format, one entry point for all of them.

    from model.checkpoints import from_pretrained, load_checkpoint, save_checkpoint, detect_format
    model = from_pretrained("path/to/checkpoint")           # any format below; eval mode, fp32 on CPU
    cfg, state_dict = load_checkpoint("stories260K.bin")     # (LlamaConfig, our parameter names)
    save_checkpoint(state_dict, cfg, "out/hf", format="hf")  # or format="native" / "meta"
    reader = open_checkpoint("out/hf")                       # lazy, slice-wise (reader.py)
    write_checkpoint(reader, cfg, "out/meta", format="meta") # streamed: one tensor in memory at a time

Formats (``detect_format`` tells them apart by their files):
- ``native``  our directory: config.json (``"format": "llama-native"``) + model.safetensors  (``native.py``)
- ``hf``      Hugging Face LlamaForCausalLM directory or hub repo id                       (``hf.py``)
- ``meta``    Meta's consolidated.NN.pth + params.json                                      (``meta.py``)
- ``llama2c`` llama2.c ``.bin`` (v0 legacy, v1 float32)                                      (``llama2c.py``)

Every state dict returned uses our names and our (half-split) RoPE layout; pickled files are only ever
read through ``safe_load.safe_torch_load`` (``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from model.checkpoints.common import (
    DEFAULT_MAX_SHARD_BYTES,
    MemoryReader,
    StateDict,
    TensorSource,
    WeightReader,
)
from model.checkpoints.hf import load_hf, save_hf, write_hf
from model.checkpoints.llama2c import load_llama2c
from model.checkpoints.meta import load_meta, write_meta
from model.checkpoints.native import as_state_dict, check_state_dict, load_native, save_native, write_native
from model.checkpoints.reader import FORMATS, Format, detect_format, load_checkpoint, open_checkpoint
from model.checkpoints.safe_load import UnsafeCheckpointError, safe_torch_load
from model.config import LlamaConfig
from model.llama import Llama, RotaryEmbedding

WRITABLE: tuple[str, ...] = ("native", "hf", "meta")

__all__ = [
    "FORMATS",
    "Format",
    "StateDict",
    "detect_format",
    "load_checkpoint",
    "UnsafeCheckpointError",
    "from_pretrained",
    "load_hf",
    "load_llama2c",
    "load_meta",
    "load_native",
    "open_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
    "save_hf",
    "save_native",
    "write_checkpoint",
    "WeightReader",
]


def save_checkpoint(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    cfg: LlamaConfig,
    out: str | Path,
    *,
    format: Literal["native", "hf", "meta"] = "native",
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory in ``format`` (atomically); returns its path."""
    state_dict = as_state_dict(model_or_state_dict)
    check_state_dict(state_dict, cfg, source="save_checkpoint(state_dict)")
    return write_checkpoint(MemoryReader(cfg, state_dict, source="save_checkpoint(state_dict)"), cfg, out,
                            format=format, overwrite=overwrite)


def write_checkpoint(
    source: TensorSource,
    cfg: LlamaConfig,
    out: str | Path,
    *,
    format: Literal["native", "hf", "meta"] = "native",
    overwrite: bool = False,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Stream ``source`` (a reader, a portable training checkpoint) into ``format``, one tensor at a time."""
    from model.checkpoints.streaming import parse_size

    if format == "native":
        return write_native(source, cfg, out, overwrite=overwrite, max_shard_bytes=parse_size(max_shard_bytes),
                            dtype=dtype)
    if format == "hf":
        return write_hf(source, cfg, out, overwrite=overwrite, max_shard_bytes=max_shard_bytes, dtype=dtype)
    if format == "meta":
        return write_meta(source, cfg, out, overwrite=overwrite, dtype=dtype)
    raise ValueError(f"cannot write format {format!r}; choose one of {', '.join(WRITABLE)}")


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    format: Format | None = None,
) -> Llama:
    """Load any supported checkpoint as a ``Llama`` in eval mode.

    The model is built on the meta device (no memory, no random init) and the loaded tensors are
    assigned in place of its parameters, so the weights exist once, not twice.
    """
    cfg, state_dict = load_checkpoint(path, format=format)
    check_state_dict(state_dict, cfg, source=path)
    with torch.device("meta"):
        model = Llama(cfg)
    # RoPE tables are plain attributes computed in __init__: rebuild them off the meta device.
    model.rotary = RotaryEmbedding(cfg)
    converted: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        converted[name] = tensor.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        converted["output.weight"] = converted["tok_embeddings.weight"]
    model.load_state_dict(converted, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta or model.rotary.inv_freq_cpu.is_meta:
        raise RuntimeError(f"from_pretrained({path}): tensors left uninitialised on the meta device: "
                           f"{left_on_meta or ['rotary.inv_freq_cpu']}")
    return model.eval()
