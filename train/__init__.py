"""The pretraining stage: typed run config, loop, atomic checkpoints, health checks, metrics, report.

    python -m train --config configs/pretrain/tiny_cpu.toml --run.dir runs/tiny
    python -m train.report runs/tiny
    python -m train.quickstart

The DeepSpeed engine (``train/engine.py``) and the process groups (``train/topology.py``) are the only
places that touch DeepSpeed / megatron process groups; everything here talks to them through the
interfaces in ``docs/TRAIN_INTERFACES.md``.
"""
