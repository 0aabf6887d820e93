"""Consolidate a training checkpoint (any TP x PP x ZeRO layout) into a native, Hugging Face or Meta checkpoint.

    python -m train.consolidate --checkpoint runs/x/checkpoints/step_00000050 --output runs/x/hf --format hf
    python -m train.consolidate --checkpoint runs/x --output runs/x/native        # newest complete checkpoint
    python -m train.consolidate --checkpoint runs/x --output runs/x/meta --format meta --dtype bfloat16
    python -m train.consolidate --checkpoint runs/x --output runs/x/hf --format hf --max-shard-size 2GB

Runs in a plain process (no launcher, no GPU, no DeepSpeed): it reads the checkpoint's portable files
(``portable/tp*-pp*-dp*.safetensors``: each rank's fp32 fragment of its TP slice; see ``train/portable.py``)
and streams: every output tensor is assembled from the fragments that hold it, written, and dropped before the
next one is read. Peak memory is about the interpreter plus two of the largest tensors (the embedding or the
head), whatever the model size: ``benchmarks/bench_checkpoint_memory.py`` measures it. Hugging Face and native
outputs are sharded above ``--max-shard-size`` (default "5GB" = 5e9 bytes, as ``save_pretrained``) with
``model.safetensors.index.json``; the Meta output is ``consolidated.00.pth`` + ``params.json``. The output
directory is written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model.checkpoints import write_checkpoint
from model.checkpoints.native import DEFAULT_MAX_SHARD_BYTES
from model.config import LlamaConfig
from train.checkpointing import CheckpointManager, is_complete
from train.portable import PortableCheckpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_N`` directory as is; a run directory -> its newest complete checkpoint."""
    path = Path(path)
    if is_complete(path):
        return path
    found = CheckpointManager(path, rank=1).find_resume("auto")  # rank 1: never creates directories
    if found is None:
        raise ValueError(f"{path}: neither a complete checkpoint (step_N with COMPLETE and meta.json) nor a run "
                         "directory holding one under checkpoints/")
    return found


def consolidate(checkpoint: str | Path, output: str | Path, *, format: str = "native", overwrite: bool = False,
                max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Stream the full model of ``checkpoint`` to ``output`` in ``format`` ("native", "hf" or "meta")."""
    ckpt = resolve_checkpoint(checkpoint)
    reader = PortableCheckpoint(ckpt)
    model_cfg = LlamaConfig.from_dict(reader.layout["model"])
    return write_checkpoint(reader.source(model_cfg), model_cfg, output, format=format,  # type: ignore[arg-type]
                            overwrite=overwrite, max_shard_bytes=max_shard_bytes, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_N checkpoint directory or a run directory")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--format", choices=("native", "hf", "meta"), default="native")
    parser.add_argument("--max-shard-size", default="5GB", help="native/hf: largest weights file (default 5GB)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the fp32 master weights (default: fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.output, format=args.format, overwrite=args.overwrite,
                          max_shard_bytes=args.max_shard_size, dtype=DTYPES.get(args.dtype or ""))
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(resolve_checkpoint(args.checkpoint)), "output": str(out),
                      "format": args.format}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
