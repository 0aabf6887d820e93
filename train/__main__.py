"""Pretraining entry point: one process, or one per device under torchrun.

    python -m train --config configs/pretrain/tiny_cpu.toml [--section.key=value | --section.key value ...]
    torchrun --nproc-per-node 2 -m train --config configs/pretrain/tiny_cpu.toml --zero.stage 2
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT --nproc-per-node 8 \\
        -m train --config configs/pretrain/llama2_7b.toml --data.path runs/data --resume auto

``--resume auto`` continues from the newest complete checkpoint in ``run.dir`` (or starts fresh).
``--print-config`` prints the resolved config and exits. Exit codes: 0 finished or pre-empted by SIGUSR1
(checkpoint written; the SLURM script requeues with --resume auto), 143 pre-empted by SIGTERM (checkpoint
written), 2 bad config or no intact checkpoint to resume (``ConfigError``: one line, no traceback; any other
error keeps its traceback), 3 aborted by the health checks (non-finite losses).
"""

from __future__ import annotations

import argparse
import sys

from train.config import RunConfig
from train.config_reader import ConfigError, add_config_arguments
from train.health import NonFiniteAbort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RunConfig, prog="python -m train",
                         example="--config configs/pretrain/tiny_cpu.toml --train.steps=20 --run.dir=runs/tiny")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, overrides = parser.parse_known_args(argv)
    try:  # config errors (also the data and checkpoint checks of the loop) print one line; the rest a traceback
        cfg = RunConfig.from_toml(args.config, overrides)
        if args.print_config:
            print(cfg.to_toml())
            return 0
        from train.loop import train

        result = train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteAbort as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
