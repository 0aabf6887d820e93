"""Fold LoRA adapters into their base checkpoint: a plain checkpoint any tool reads, written one tensor at a time.

    python -m rlhf.merge_lora --base runs/tiny_real/final_model --adapter runs/sft_lora/final_adapter \\
        --output runs/sft_lora/merged [--format native|hf|meta] [--dtype bf16]

``--base``: any checkpoint ``model.checkpoints.open_checkpoint`` reads (native, HF, Meta, llama2.c; a run
directory means its ``final_model/``). ``--adapter``: a PEFT LoRA directory (``adapter_config.json`` +
``adapter_model.safetensors``), as the stages trained with ``[lora]`` export it or ``peft``'s ``save_pretrained``
writes it for a ``LlamaForCausalLM``. Each adapted projection becomes ``W + (lora_alpha / r) B A`` (in fp32, then
the base's dtype or ``--dtype``); everything else is copied. Only one base tensor and the (small) adapters are in
memory at once (``model.checkpoints.lora_adapters.MergedReader``). An ``rlhf.json`` sidecar beside the adapter or
the base (tokenizer, chat template) is copied next to the merged weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf.paths import checkpoint_dir
from train.config_reader import ConfigError, FlagHelpFormatter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIDECAR = "rlhf.json"


def merge_adapter(base: str | Path, adapter: str | Path, output: str | Path, *, format: str = "native",
                  dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``base`` with ``adapter`` merged to ``output`` (streamed); returns ``output``."""
    from model.checkpoints import open_checkpoint, write_checkpoint
    from model.checkpoints.lora_adapters import MergedReader, read_peft_adapter

    base_dir = checkpoint_dir(base)
    if not base_dir.exists():
        raise ConfigError(f"--base {base_dir}: no such file or directory")
    try:
        spec, adapters = read_peft_adapter(adapter)
        source = MergedReader(open_checkpoint(base_dir), adapters, spec)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(str(err)) from err
    out = write_checkpoint(source, source.cfg, output, format=format, overwrite=overwrite, dtype=dtype)
    for where in (Path(adapter), base_dir if base_dir.is_dir() else base_dir.parent):
        if (where / SIDECAR).is_file():
            meta = json.loads((where / SIDECAR).read_text())
            meta["merged_from"] = {"base": str(base_dir), "adapter": str(adapter)}
            (Path(out) / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
            break
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.merge_lora", description=__doc__,
                                     formatter_class=FlagHelpFormatter)
    parser.add_argument("--base", required=True, help="the checkpoint the adapters were trained on")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA directory")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--format", default="native", choices=("native", "hf", "meta"), help="output format")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the base's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        out = merge_adapter(args.base, args.adapter, args.output, format=args.format,
                            dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.overwrite)
    except (ConfigError, ValueError) as err:  # ValueError: an existing non-empty --output without --overwrite
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.base} -> {out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
