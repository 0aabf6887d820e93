"""The only place this project unpickles checkpoint files: ``torch.load`` with ``weights_only=True``.

    from model.checkpoints.safe_load import safe_torch_load
    state = safe_torch_load("consolidated.00.pth")      # dict of tensors, or UnsafeCheckpointError

A ``.pth`` / ``.bin`` file is a pickle, and a pickle can run arbitrary code when loaded (any object whose
``__reduce__`` returns ``os.system``). PyTorch's ``weights_only`` unpickler only reconstructs tensors,
storages and primitive containers (dict, list, tuple, str, numbers, ...), and refuses any other global
*before* calling it, so a malicious file fails here with nothing executed. Prefer safetensors wherever a
format allows it: those files hold no code at all.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A pickle-based checkpoint asked to construct something other than tensors and plain containers."""


def safe_torch_load(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is allowed.

    Zip-format files (everything ``torch.save`` wrote since PyTorch 1.6) are memory-mapped, so loading a
    large shard does not read it into memory twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    mmap = zipfile.is_zipfile(path)  # torch only memory-maps the zip format, not legacy pickles
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file is a pickle that asks to construct objects other than tensors "
            "and primitive containers (dict, list, tuple, str, int, float, bool, None); only those are allowed, "
            "because unpickling arbitrary objects can execute code. If you trust the file, re-save its tensors "
            f"with safetensors. Unpickler said: {_unpickler_reason(err)}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err


def _unpickler_reason(err: Exception) -> str:
    """The specific refusal from torch's message, without its advice to retry with ``weights_only=False``."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split()) or type(err).__name__
