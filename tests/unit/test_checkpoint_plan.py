"""Planner: checkpoint bytes per rank, total, stall and write time, 7B-405B (``launch/checkpoint_plan.py``).

    pytest tests/unit/test_checkpoint_plan.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.checkpoint_plan import Storage, checkpoint_cost
from launch.planner import Layout
from model.config import get_config
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("name", "layout"), [
    ("llama2_7b", Layout(tp=1, pp=1, dp=8, zero_stage=3)),
    ("llama2_13b", Layout(tp=2, pp=1, dp=16, zero_stage=2)),
    ("llama2_70b", Layout(tp=8, pp=8, dp=16, zero_stage=1)),
    ("llama3_1_405b", Layout(tp=8, pp=16, dp=128, zero_stage=1)),
])
def test_total_is_12_bytes_per_parameter_split_over_every_rank(name: str, layout: Layout) -> None:
    cfg = get_config(name)
    cost = checkpoint_cost(cfg, layout)
    # fp32 master + two Adam moments; only the RMSNorm weights are written once per TP rank
    norms = (2 * cfg.n_layers + 1) * cfg.dim * (layout.tp - 1)
    assert cost.total_bytes == pytest.approx(12 * (cfg.num_params() + norms), rel=1e-6)
    assert cost.bytes_per_rank_max == pytest.approx(cost.total_bytes / layout.gpus, rel=0.1)
    assert cost.bytes_per_rank_max / cost.bytes_per_rank_min < 1.3


def test_times_follow_the_stated_bandwidths() -> None:
    cfg, layout = get_config("llama2_70b"), Layout(tp=8, pp=8, dp=16, zero_stage=1)
    slow = checkpoint_cost(cfg, layout, storage=Storage(node_write_gbps=1.0, aggregate_gbps=1e6, host_copy_gbps=10))
    assert slow.stall_s == pytest.approx(slow.bytes_per_rank_max / 10e9)
    assert slow.write_s == pytest.approx(8 * slow.bytes_per_rank_max / 1e9)  # 8 ranks per node, 1 GB/s per node
    shared = checkpoint_cost(cfg, layout, storage=Storage(node_write_gbps=1e6, aggregate_gbps=100.0))
    assert shared.write_s == pytest.approx(shared.total_bytes / 100e9)  # the filesystem is the limit
    zero3_7b = checkpoint_cost(get_config("llama2_7b"), Layout(tp=1, pp=1, dp=64, zero_stage=3))
    assert zero3_7b.bytes_per_rank_max == pytest.approx(12 * get_config("llama2_7b").num_params() / 64, rel=1e-6)


def test_plan_cli_reports_checkpoint_cost() -> None:
    cmd = [sys.executable, "-m", "launch", "plan", "--model", "llama3_1_405b", "--gpus", "16384", "--seq-len",
           "8192", "--global-batch-tokens", "16777216", "--top-k", "2", "--storage-node-gbps", "5", "--json"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    plans = json.loads(out.stdout)["plans"]
    for plan in plans:
        ckpt = plan["checkpoint"]
        assert ckpt["storage"]["node_write_gbps"] == 5
        assert ckpt["total_bytes"] > 12 * 405e9 and ckpt["write_s"] > 0 and ckpt["stall_s"] > 0
    text = subprocess.run(cmd[:-1], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "ckpt GB/rank" in text and "stall s" in text
