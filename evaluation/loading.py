"""Load a checkpoint for evaluation with our own code: whole in one process, or each rank its TP slice.

    from evaluation.loading import load_model, find_tokenizer
    model = load_model("runs/x/final_model", groups=EvalGroups.from_topology(topo))   # native or HF directory
    tokenizer_path = find_tokenizer("runs/x/final_model", None)                      # DIR/tokenizer.model

At TP 1 this is ``model.from_pretrained``. Above it the network is built on the meta device with megatron-core's
tensor-parallel layers (``model.parallel.MegatronLayers``) and every parameter is filled from the checkpoint
reader slice-wise (``open_checkpoint(...).read_slice``: safetensors copies out only this rank's rows or columns),
so a rank never holds more than its shard plus the tensor being read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evaluation.parallel import EvalGroups
from model.llama import Llama, RotaryEmbedding

TOKENIZER_NAMES = ("tokenizer.model", "tok.model")


def find_tokenizer(checkpoint: str | Path, tokenizer: str | Path | None) -> Path:
    """``tokenizer`` if given, else a tokenizer file inside the checkpoint directory; a clear error otherwise."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer {path}: no such file")
        return path
    for name in TOKENIZER_NAMES:
        candidate = Path(checkpoint) / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{checkpoint}: no {' or '.join(TOKENIZER_NAMES)} inside; pass --tokenizer FILE (the "
                            "SentencePiece or tiktoken file the model was trained with)")


def load_model(checkpoint: str | Path, *, groups: EvalGroups, dtype: torch.dtype = torch.float32) -> Llama:
    """Our ``Llama`` in eval mode on ``groups.device``, TP-sharded when ``groups.tp_size > 1``."""
    if groups.tp_size == 1:
        from model.checkpoints import from_pretrained

        return from_pretrained(checkpoint, dtype=dtype, device=groups.device)
    return _load_tensor_parallel(checkpoint, groups=groups, dtype=dtype)


@torch.no_grad()
def _load_tensor_parallel(checkpoint: str | Path, *, groups: EvalGroups, dtype: torch.dtype) -> Llama:
    from megatron.core import parallel_state

    from model.checkpoints import open_checkpoint
    from model.parallel import MegatronLayers

    if parallel_state.get_tensor_model_parallel_world_size() != groups.tp_size:
        raise RuntimeError(f"load_model: megatron-core's TP size is "
                           f"{parallel_state.get_tensor_model_parallel_world_size()}, asked for {groups.tp_size}; "
                           "initialise train.topology.Topology with the same tp first")
    reader = open_checkpoint(checkpoint)
    cfg = reader.cfg
    with torch.device("meta"):  # no allocation, no random init: every tensor is read below
        model = Llama(cfg, layers=MegatronLayers(params_dtype=dtype))
    model.rotary = RotaryEmbedding(cfg)  # RoPE tables are computed in __init__, not on meta
    # to_empty makes new Parameter objects: keep the split dimensions, and re-tie a tied head after it.
    split_dims = {name: getattr(p, "tp_dim", None) for name, p in model.named_parameters()}
    model = model.to_empty(device=groups.device)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        dim = split_dims[name]
        if dim is None:
            full = reader.read(name)
        else:
            size = param.shape[dim]
            full = reader.read_slice(name, dim=dim, start=tp_rank * size, stop=(tp_rank + 1) * size)
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"{checkpoint}: {name} read as {tuple(full.shape)}, this rank's slice is "
                             f"{tuple(param.shape)} (tp {tp_rank}/{groups.tp_size})")
        param.copy_(full.to(dtype))
    return model.eval()
