"""The Llama model family: configs for every published size, the network, generation, checkpoints.

    from model import from_pretrained, get_config, Llama
    model = from_pretrained("path/to/native-or-hf-dir")     # plain process, no launcher needed
    logits = model(tokens)                                  # Long[b, s] -> Float[b, s, vocab]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model.config import LlamaConfig, RopeScaling, get_config, known_configs
from model.llama import Llama

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Llama", "LlamaConfig", "RopeScaling", "from_pretrained", "get_config", "known_configs"]


def from_pretrained(path: Any, **kwargs: Any) -> nn.Module:
    """Load a native or Hugging Face checkpoint directory (see ``model.checkpoints.from_pretrained``)."""
    from model.checkpoints import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
