"""Consolidate a training checkpoint (any TP x PP x ZeRO layout) into one native or Hugging Face checkpoint.

    python -m train.consolidate --checkpoint runs/x/checkpoints/step_00000050 --output runs/x/hf --format hf
    python -m train.consolidate --checkpoint runs/x --output runs/x/native        # newest complete checkpoint

Runs in a plain process (no launcher, no GPU, no DeepSpeed): it reads the checkpoint's portable copy
(``portable/tp*-pp*.safetensors``, fp32 master weights by parameter name, written by every save; see
``train/portable.py``), concatenates the tensor-parallel slices and writes the result atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.checkpoints import save_checkpoint
from model.config import LlamaConfig
from train.checkpointing import CheckpointManager, is_complete
from train.portable import PortableCheckpoint


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


def consolidate(checkpoint: str | Path, output: str | Path, *, format: str = "native",
                overwrite: bool = False) -> Path:
    """Write the full model of ``checkpoint`` to ``output`` in ``format`` ("native" or "hf")."""
    ckpt = resolve_checkpoint(checkpoint)
    reader = PortableCheckpoint(ckpt)
    model_cfg = LlamaConfig.from_dict(reader.layout["model"])
    return save_checkpoint(reader.full_state_dict(), model_cfg, output, format=format, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_N checkpoint directory or a run directory")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--format", choices=("native", "hf"), default="native")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.output, format=args.format, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(resolve_checkpoint(args.checkpoint)), "output": str(out),
                      "format": args.format}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
