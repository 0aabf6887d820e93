"""Checkpoint averaging (Llama 3 sec. 4.1.5: "we average models obtained from experiments using various versions
of data or hyperparameters at each RM, SFT, or DPO stage"), streamed one tensor at a time.

    python -m rlhf.average --checkpoint runs/dpo_a --checkpoint runs/dpo_b [--weights 0.7 0.3] --output runs/avg
    python -m rlhf.average --checkpoint A --checkpoint B --output C --format hf --dtype bf16

Each ``--checkpoint`` is any checkpoint ``model.checkpoints.open_checkpoint`` reads (native, HF, Meta; a run
directory means its ``final_model/``). The output tensor ``name`` is ``sum_i w_i * read_i(name) / sum_i w_i``,
accumulated in float32 and written in the first checkpoint's dtype (or ``--dtype``); only one tensor of each input
and the running sum are in memory at once, so averaging three 405B checkpoints needs a few GB, not 3 x 810 GB.
Checkpoints whose model configs differ (shape, RoPE, norm eps, vocabulary ...) are refused with the differing
fields and both values: averaging weights of different models is meaningless. An ``rlhf.json`` sidecar of the
first checkpoint (tokenizer, template) is copied next to the averaged weights so later stages can use it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhf.paths import checkpoint_dir
from train.config_reader import ConfigError, FlagHelpFormatter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIDECARS = ("rlhf.json",)  # the SFT / DPO exports' sidecar (tokenizer, template, split)


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``"field: A vs B"`` for every model-config field that differs (the name is informational only)."""
    keys = sorted((set(a) | set(b)) - {"name"})
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


class AveragedWeights:
    """A ``TensorSource`` (``names``/``specs``/``read``) over several readers of the same model."""

    def __init__(self, readers: Sequence[Any], weights: Sequence[float], *, dtype: torch.dtype | None = None,
                 sources: Sequence[str] | None = None) -> None:
        if len(readers) < 2:
            raise ConfigError(f"averaging needs at least 2 checkpoints, got {len(readers)}")
        if len(weights) != len(readers):
            raise ConfigError(f"--weights: {len(weights)} weights for {len(readers)} checkpoints; give one per "
                              "--checkpoint (or none for the plain mean)")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"--weights {list(weights)}: must be >= 0 with a positive sum")
        sources = list(sources or [str(i) for i in range(len(readers))])
        first = readers[0].cfg.to_dict()
        for reader, source in zip(readers[1:], sources[1:]):
            diff = config_differences(first, reader.cfg.to_dict())
            if diff:
                raise ConfigError(f"{source} is not the same model as {sources[0]}: " + "; ".join(diff)
                                  + "; average only checkpoints of one model config")
        self.readers, self.cfg, self.dtype = list(readers), readers[0].cfg, dtype
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]

    def names(self) -> list[str]:
        return self.readers[0].names()

    def specs(self) -> list[Any]:
        from model.checkpoints.streaming import TensorSpec

        return [TensorSpec(s.name, s.shape, self.dtype or s.dtype) for s in self.readers[0].specs()]

    def read(self, name: str) -> Tensor:
        out_dtype = self.dtype or self.readers[0].spec(name).dtype
        total: Tensor | None = None
        for reader, w in zip(self.readers, self.weights):
            t = reader.read(name).to(torch.float32)
            total = t.mul_(w) if total is None else total.add_(t, alpha=w)
            del t
        assert total is not None
        return total.to(out_dtype)


def average_checkpoints(checkpoints: Sequence[str | Path], output: str | Path, *,
                        weights: Sequence[float] | None = None, format: str = "native",
                        dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write the weighted average of ``checkpoints`` to ``output`` (streamed); returns ``output``."""
    from model.checkpoints import open_checkpoint, write_checkpoint

    dirs = [checkpoint_dir(c) for c in checkpoints]
    for d in dirs:
        if not d.exists():
            raise ConfigError(f"--checkpoint {d}: no such file or directory")
    readers = [open_checkpoint(d) for d in dirs]
    source = AveragedWeights(readers, list(weights) if weights else [1.0] * len(readers), dtype=dtype,
                             sources=[str(d) for d in dirs])
    out = write_checkpoint(source, source.cfg, output, format=format, overwrite=overwrite, dtype=dtype)
    for name in SIDECARS:
        if (dirs[0] / name).is_file():
            meta = json.loads((dirs[0] / name).read_text())
            meta["averaged_from"] = {"checkpoints": [str(d) for d in dirs], "weights": source.weights}
            (Path(out) / name).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.average", description=__doc__,
                                     formatter_class=FlagHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="a checkpoint to average (repeat)")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per --checkpoint (default: equal)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--format", default="native", choices=("native", "hf", "meta"), help="output format")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the first checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        out = average_checkpoints(args.checkpoint, args.output, weights=args.weights, format=args.format,
                                  dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.overwrite)
    except (ConfigError, ValueError) as err:  # ValueError: an existing non-empty --output without --overwrite
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"averaged {len(args.checkpoint)} checkpoints -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["AveragedWeights", "average_checkpoints", "config_differences", "main"]
