"""Test hooks read from the environment, and the production defaults they replace.

    topology = default_topology(cfg)            # LLAMA_TRAIN_TOPOLOGY="module:callable" replaces Topology
    engine = default_engine(model_cfg=..., engine_cfg=cfg.engine_config(), topology=topology)  # LLAMA_TRAIN_ENGINE
    hang_if_asked(rank, step)                   # LLAMA_TEST_HANG=RANK:STEP: that rank stops answering
    evaluator = loop_evaluator(cfg, topology)   # [eval]'s evaluator (cfg.eval.hook), or None when off

They let unit tests run the real loop with a small local engine (``tests/unit/test_train_loop.py``) and the
hang tests make one rank stop (``tests/distributed/test_hang.py``). Other hooks live where they act:
``LLAMA_TEST_NAN_STEPS`` in ``train/engine.py``, ``LLAMA_TEST_SLOW_CHECKPOINT`` in ``train/checkpointing.py``.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

from train.config import ConfigError, EngineConfig, RunConfig


def _import(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def default_topology(cfg: RunConfig) -> Any:
    """``train.topology.Topology`` for the configured layout, or the ``LLAMA_TRAIN_TOPOLOGY`` replacement."""
    if os.environ.get("LLAMA_TRAIN_TOPOLOGY"):  # test hook: "module:callable(cfg)"
        return _import(os.environ["LLAMA_TRAIN_TOPOLOGY"])(cfg)
    from train.topology import Topology

    return Topology.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp,
                               timeout_s=cfg.train.collective_timeout_s)


def default_engine(*, model_cfg: Any, engine_cfg: EngineConfig, topology: Any, **kwargs: Any) -> Any:
    """``train.engine.TrainEngine``, or the ``LLAMA_TRAIN_ENGINE`` replacement (same interface)."""
    if os.environ.get("LLAMA_TRAIN_ENGINE"):  # test hook: "module:Class" with TrainEngine's interface
        return _import(os.environ["LLAMA_TRAIN_ENGINE"])(model_cfg=model_cfg, engine_cfg=engine_cfg,
                                                         topology=topology, **kwargs)
    from train.engine import TrainEngine

    return TrainEngine(model_cfg=model_cfg, engine_cfg=engine_cfg, topology=topology, **kwargs)


def loop_evaluator(cfg: RunConfig, topology: Any) -> Any:
    """The in-loop evaluator named by ``cfg.eval.hook`` (``module:callable(cfg=, topology=)``), or None when off.

    Named, not imported: the default, ``evaluation.in_loop.LoopEvaluator``, lives in evaluation/, which imports
    train/ (the topology, this config), so an import from here would close a circle. The evaluator checks its task
    names, data files and tokenizer when it is built, which the loop does before the data and the engine: a bad
    ``[eval]`` stops the run in seconds with a ``ConfigError``. Its ``evaluate(engine, step=)`` returns flat
    metrics (``{"eval/hellaswag/acc": ...}``) and is collective.
    """
    if not cfg.eval.every:
        return None
    try:
        factory = _import(cfg.eval.hook)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"eval.hook={cfg.eval.hook!r}: cannot import it ({err})") from None
    return factory(cfg=cfg, topology=topology)


def hang_if_asked(rank: int, step: int) -> None:
    """``LLAMA_TEST_HANG=RANK:STEP``: that rank stops answering collectives at that step."""
    spec = os.environ.get("LLAMA_TEST_HANG", "")
    if spec and tuple(int(x) for x in spec.split(":")) == (rank, step):
        time.sleep(3600)

