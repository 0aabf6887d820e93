"""The Llama network as a flat list of pipeline stages: embedding, one entry per block, norm + head.

    from train.pipeline import pipeline_layers, native_name
    layers = pipeline_layers(cfg, factory)      # [EmbeddingStage, BlockStage x n_layers, HeadStage]

DeepSpeed's ``PipelineModule`` (built in ``train/parallelize.py``; DeepSpeed is imported only by ``train/deepspeed_api.py``)
partitions this list over the pipeline stages and runs 1F1B over micro-batches. Activations travel
between stages as ``(hidden, document_ids)`` so that every block can rebuild the document mask of packed
sequences; the integer ``document_ids`` carry no gradient.

Each stage reuses the model's own modules (``TransformerBlock``, ``RMSNorm``, the ``LayerFactory`` layers),
so the math is the one in ``model/llama.py``. ``PipelineModule`` names a parameter by its layer index
(``"3.attention.wq.weight"``); ``native_name`` maps it back to the plain model's name
(``"layers.2.attention.wq.weight"``), which seeds initialisation and keys every consolidated checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.attention import AttentionMask
from model.config import LlamaConfig
from model.context_parallel import ContextParallel
from model.layers import LayerFactory
from model.llama import RMSNorm, TransformerBlock
from model.rope import RotaryEmbedding
from train.config import ConfigError

Activation = tuple[Tensor, Tensor]


class EmbeddingStage(nn.Module):
    """``(tokens, document_ids) -> (hidden, document_ids)``."""

    def __init__(self, cfg: LlamaConfig, layers: LayerFactory) -> None:
        super().__init__()
        self.tok_embeddings = layers.embedding(cfg.vocab_size, cfg.dim)

    def forward(self, inputs: Activation) -> Activation:
        tokens, document_ids = inputs
        return self.tok_embeddings(tokens), document_ids


class BlockStage(TransformerBlock):
    """One transformer block that builds its own RoPE tables and document mask from the activation tuple."""

    def __init__(self, cfg: LlamaConfig, layers: LayerFactory, layer_index: int, document_mask: bool = True) -> None:
        super().__init__(cfg, layers, layer_index)
        self.rotary = RotaryEmbedding(cfg)  # tables only, no parameters
        self.document_mask = document_mask
        object.__setattr__(self, "layer_factory", layers)  # not a module: asked per forward whether SP splits it
        self.context: ContextParallel | None = None
        """Context parallelism (set by ``train.parallelize``): the activation holds this rank's two chunks of each
        sequence, whose global positions RoPE needs."""

    def forward(self, inputs: Activation) -> Activation:  # type: ignore[override]
        h, document_ids = inputs
        # With sequence parallelism ``h`` holds s / tp tokens; q/k/v gather the rest, RoPE needs all s positions.
        local = h.shape[1] * getattr(self.layer_factory, "sequence_split", 1)
        if self.context is not None and self.context.enabled:
            positions = self.context.positions(local * self.context.size, h.device)
        else:
            positions = torch.arange(local, device=h.device)[None]
        mask = AttentionMask(document_ids=document_ids if self.document_mask else None)
        return super().forward(h, self.rotary(positions), mask=mask), document_ids


class HeadStage(nn.Module):
    """``(hidden, document_ids) -> logits`` (this TP rank's vocabulary slice)."""

    def __init__(self, cfg: LlamaConfig, layers: LayerFactory) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = layers.output_head(cfg.dim, cfg.vocab_size)

    def forward(self, inputs: Activation) -> Tensor:
        h, _ = inputs
        return self.output(self.norm(h))


def stage_builders(cfg: LlamaConfig, *, document_mask: bool = True) -> list[tuple[type[nn.Module], tuple]]:
    """``(class, args after the LayerFactory)`` for each entry of the flat list, in order."""
    if cfg.tie_embeddings:
        raise ConfigError(f"model {cfg.name!r} ties embedding and head; pipeline parallelism needs them untied "
                         "(set --model.overrides.tie_embeddings=false or --parallel.pp=1)")
    return ([(EmbeddingStage, ())] + [(BlockStage, (i, document_mask)) for i in range(cfg.n_layers)] + [(HeadStage, ())])


def pipeline_layers(cfg: LlamaConfig, layers: LayerFactory, *, document_mask: bool = True) -> list[nn.Module]:
    """The whole flat list, built in this process (tests and single-process references)."""
    return [cls(cfg, layers, *args) for cls, args in stage_builders(cfg, document_mask=document_mask)]


def native_name(pipe_name: str, *, n_layers: int) -> str:
    """``"0.tok_embeddings.weight"`` -> ``"tok_embeddings.weight"``; ``"3.x"`` -> ``"layers.2.x"``; head -> as is."""
    index, _, rest = pipe_name.partition(".")
    i = int(index)
    if 1 <= i <= n_layers:
        return f"layers.{i - 1}.{rest}"
    return rest


def pipe_name(name: str, *, n_layers: int) -> str:
    """Inverse of ``native_name``."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"{int(index) + 1}.{rest}"
    if name.startswith("tok_embeddings."):
        return f"0.{name}"
    return f"{n_layers + 1}.{name}"
