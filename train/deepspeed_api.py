"""DeepSpeed, imported once with this project's CPU settings: the only module that imports ``deepspeed``.

    from train.deepspeed_api import deepspeed, PipelineModule, safe_get_full_fp32_param

Two modules use it: ``train/parallelize.py`` builds with it (``PipelineModule``, ``deepspeed.initialize``:
pipeline stages and ZeRO), ``train/engine.py`` runs with it (steps, checkpoints, ZeRO-3 gathers). Keeping the
import here means the settings below hold before DeepSpeed reads them, whoever imports it first.

- Without CUDA, ``DS_ACCELERATOR=cpu`` is set before the import (DeepSpeed would otherwise probe for one and warn).
- DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (~80 s per fresh cache) when its
  communication backend starts; it only serves inference all-reduce, so training never needs it and its build
  is skipped. (``import deepspeed.comm.torch as m`` would bind the real torch: deepspeed.comm re-exports it as
  ``torch``, hence ``sys.modules``.)
- DeepSpeed's INFO logging is lowered to warnings.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.pipe import LayerSpec, PipelineModule  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, ProcessTopology  # noqa: E402
from deepspeed.runtime.utils import partition_uniform  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402
from deepspeed.utils import (  # noqa: E402
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

if not torch.cuda.is_available():
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

__all__ = ["DeepSpeedZeroOptimizer", "LayerSpec", "PipeModelDataParallelTopology", "PipelineModule", "ProcessTopology", "deepspeed", "partition_uniform",
           "safe_get_full_fp32_param", "safe_get_full_optimizer_state", "safe_set_full_fp32_param",
           "safe_set_full_optimizer_state"]
