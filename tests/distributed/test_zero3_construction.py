"""ZeRO-3 builds the model partitioned (``deepspeed.zero.Init``): no rank materialises its whole TP shard.

One ``torchrun`` launch of 2 processes (DP2 x ZeRO-3) builds ``TrainEngine`` on the parity config and checks, before DeepSpeed's engine exists: every
parameter is a ZeRO-3 parameter with no local storage, and the rank holds 1/2 of the elements (its partitions);
after the seeded init is written into the partitions, the gathered weights equal ``init_llama_weights`` of a
plain one-process ``Llama`` bit for bit (the same values as when the model was built whole). The training
parity of every ZeRO-3 layout is ``tests/distributed/test_parity.py`` (and CP2 x ZeRO-3 in
``test_context_parallel_training.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def _worker(out: Path) -> None:
    import torch

    from model.llama import Llama, init_llama_weights
    from tests.distributed.parity_config import parity_config
    from train.engine import TrainEngine
    from train.topology import Topology

    cfg = parity_config(["--zero.stage=3"])
    model_cfg = cfg.model_config()
    topo = Topology.initialize(tp=1)
    engine = TrainEngine(model_cfg=model_cfg, engine_cfg=cfg.engine_config(), topology=topo)
    params = list(engine.module.parameters())
    report = {"partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
              "held": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
              "full": sum(p.ds_numel for p in params if hasattr(p, "ds_numel")),
              "built_before_deepspeed": engine.ds is None}
    with engine.gathered_parameters():
        weights = {engine.native_name(n): p.detach().clone() for n, p in engine.trained_module.named_parameters()}
    reference = Llama(model_cfg)
    init_llama_weights(reference, seed=cfg.train.seed, n_layers=model_cfg.n_layers)
    expected = dict(reference.named_parameters())
    report["names_match"] = sorted(weights) == sorted(expected)
    report["max_diff"] = max(float((weights[k] - expected[k]).abs().max()) for k in expected if k in weights)
    report["norms_are_ones"] = all(bool(torch.all(v == 1)) for k, v in weights.items() if k.endswith("norm.weight"))
    (out / f"rank{topo.global_rank}.json").write_text(json.dumps(report))


def test_zero3_model_is_built_partitioned_with_the_seeded_values(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["built_before_deepspeed"] and r["partitioned"], r
        assert r["held"] * 2 - r["full"] < 2 * 1024, r  # 1/2 of every parameter (+ the last rank's padding)
        assert r["names_match"] and r["max_diff"] == 0.0 and r["norms_are_ones"], r


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]))
