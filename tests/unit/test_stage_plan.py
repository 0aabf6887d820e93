"""The alignment stages' memory planner (``launch/stage_plan.py``, ``python -m launch plan --stage``): per role and
per phase on the pretraining planner's memory model; Llama 2 7B and 70B PPO on 80 GB GPUs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from launch import planner, stage_plan
from launch.__main__ import main as launch_main
from launch.planner import GiB, Layout
from launch.stage_plan import StageShape, plan_stage, search_stage
from model.config import get_config

pytestmark = pytest.mark.timeout(120)
H100_80 = planner.hardware_for("h100-sxm", memory_bytes=80 * GiB)


def test_llama2_70b_ppo_fits_64_gpus_only_with_a_tp_sharded_rollout_copy() -> None:
    cfg = get_config("llama2_70b")
    plans = search_stage("ppo", cfg, gpus=64, hardware=H100_80)
    fitting = [p for p in plans if p.fits]
    assert fitting and fitting[0].layout.tp == 8 and all(p.layout.tp >= 4 for p in fitting), \
        [(p.layout.describe(), p.peak / GiB) for p in plans[:6]]
    assert all(p.peak > 80 * GiB for p in plans if not p.fits)
    zero3 = next(p for p in fitting if p.layout.zero_stage == 3 and p.layout.tp == 8 and p.layout.activation_checkpointing)
    assert zero3.peak_phase == "rollout"
    copy = zero3.phases["rollout"]["rollout copy"]
    assert copy == pytest.approx(2 * planner.stage_params(cfg, zero3.layout, 0))  # bf16, 1/TP of the weights
    assert copy < 2 * cfg.num_params() / 7.9
    # At TP 2 the copy is a quarter of the weights: refused, with the phase and the numbers.
    tp2 = plan_stage("ppo", cfg, dataclasses.replace(zero3.layout, tp=2, dp=32), hardware=H100_80)
    assert not tp2.fits and tp2.peak_phase == "rollout" and tp2.peak > 80 * GiB


def test_llama2_7b_ppo_fits_8_gpus_and_every_role_is_counted() -> None:
    cfg = get_config("llama2_7b")
    best = next(p for p in search_stage("ppo", cfg, gpus=8, hardware=H100_80) if p.fits)
    assert set(best.resident) == {"policy", "value", "reference", "helpfulness RM", "safety RM"}
    assert set(best.phases) == {"rollout", "scoring", "training"}
    assert best.peak == max(best.phase_total(p) for p in best.phases) <= 80 * GiB


def test_roles_use_the_pretraining_planner_memory_model() -> None:
    cfg, layout = get_config("llama2_7b"), Layout(tp=2, dp=4, zero_stage=3, activation_checkpointing=True)
    plan = plan_stage("ppo", cfg, layout, shape=StageShape(seq_len=2048, reward_models=0))
    states = planner.model_state_bytes(cfg, layout, 0)
    assert plan.resident["policy"] == {"weights": states["weights"], "optimizer states": states["optimizer_states"]}
    head = cfg.vocab_size * cfg.dim / layout.tp  # the value model has no vocab head
    p = planner.stage_params(cfg, layout, 0)
    assert plan.resident["value"]["weights"] == pytest.approx(states["weights"] * (p - head) / p)
    # PPO's trained roles run sequence parallelism (without PP, like the engine): counted on.
    assert plan.layout.sp == 2
    mem = planner.plan_memory(cfg, layout, seq_len=2048, microbatches=1, hardware=planner.Hardware(reserved_bytes=0))
    assert plan.phases["training"]["activations"] == mem.activations  # the policy trains (the larger)
    assert plan.resident["reference"] == {"weights": 2 * p / 4}  # inference-only: bf16 ZeRO-3 shard
    sft = plan_stage("sft", cfg, layout, shape=StageShape(seq_len=2048))
    assert sft.resident == {"model": plan.resident["policy"]} and set(sft.phases) == {"training"}
    dpo = plan_stage("dpo", cfg, layout, shape=StageShape(seq_len=2048))  # DPO runs sequence parallelism (no PP)
    assert dpo.layout.sp == 2
    off = planner.plan_memory(cfg, dataclasses.replace(layout, sequence_parallel=False), seq_len=2048,
                              microbatches=1, hardware=planner.Hardware(reserved_bytes=0))
    assert mem.activations < off.activations
    assert dpo.phases["training"]["activations"] == pytest.approx(2 * mem.activations, rel=0.01)  # both answers
    assert plan_stage("dpo", cfg, dataclasses.replace(layout, pp=2, dp=2)).layout.sp == 2  # on PP stages too
    assert plan_stage("ppo", cfg, dataclasses.replace(layout, pp=2, dp=2)).layout.sp == 1  # PPO: no PP stages


def test_kv_cache_bytes_equal_the_generators_allocation() -> None:
    from model.llama import KVCache, Llama

    cfg = get_config("debug_tiny")
    model = Llama(cfg).to(torch.bfloat16)
    cache = KVCache.allocate(model, batch=3, max_len=40, prepack_weights=False)
    allocated = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    planned = stage_plan.rollout_bytes(cfg, Layout(tp=1), StageShape(seq_len=40, rollout_batch=3))["KV cache"]
    assert planned == allocated


def test_cli_ranks_fitting_layouts_and_refuses_with_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", "--stage", "ppo", "--model", "llama2_70b", "--gpus", "64", "--gpu-memory", "80GiB"]
    assert launch_main([*base, "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert plans[0]["fits"] and plans[0]["layout"]["tp"] == 8 and plans[0]["peak_phase"] in plans[0]["phases"]
    assert launch_main([*base, "--tp", "2", "--zero-stage", "3", "--activation-checkpointing"]) == 1
    out = capsys.readouterr()
    assert "REFUSED: the rollout phase needs" in out.out and "GiB more than the 80 GiB" in out.out
    assert "no layout of llama2_70b (ppo) fits" in out.err
    assert launch_main(["plan", "--stage", "sft", "--model", "llama2_7b", "--gpus", "8"]) == 0
    assert "peak" in capsys.readouterr().out


def test_cpu_ppo_plan_cli_prints_every_role_and_phase(capsys: pytest.CaptureFixture[str]) -> None:
    """``plan --stage ppo --device cpu``: the CPU PPO plan (launch/cpu_ppo_plan.py; checked against measured RSS
    in tests/e2e/test_cpu_ppo_memory_plan.py), the frozen roles at the trained roles' ZeRO stage by default."""
    from launch.cpu_ppo_plan import PPOShape, plan_cpu_ppo

    argv = ["plan", "--stage", "ppo", "--device", "cpu", "--model", "bench_25m", "--gpus", "2", "--zero-stage", "3",
            "--seq-len", "24", "--micro-batch", "4", "--global-batch-tokens", "192", "--rollout-batch", "4",
            "--reward-models", "1", "--runtime-overhead", "460MB"]
    assert launch_main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["plan"]
    expected = plan_cpu_ppo(get_config("bench_25m"), tp=1, dp=2, zero_stage=3, runtime_overhead=460e6,
                            shape=PPOShape(seq_len=24, micro_batch=4, local_minibatch=4, rollout_batch=4,
                                           reward_models=1))
    assert data["peak"] == pytest.approx(expected.peak) and data["peak_phase"] == expected.peak_phase == "export"
    assert set(data["resident"]) == {"policy", "value", "reference", "reward model 1"}
    assert data["resident"]["reference"]["weights"] == pytest.approx(4 * get_config("bench_25m").num_params() / 2)
    assert launch_main(argv) == 0
    out = capsys.readouterr().out
    assert "2 processes" in out and "runtime overhead" in out and "REFUSED" not in out
    for phase in ("rollout", "scoring", "training", "checkpoint", "export"):
        assert f"    {phase}" in out
    assert launch_main([*argv[:10], "2", *argv[11:]]) == 2  # bad input: one error line naming the flag
    assert "--zero-stage 2: the CPU PPO plan models ZeRO-1 and ZeRO-3" in capsys.readouterr().err


def test_offloaded_frozen_roles_leave_the_gpu_but_count_the_scoring_gather(capsys: pytest.CaptureFixture[str]) -> None:
    """``ppo.offload_frozen``: the reference and reward models' ZeRO-3 partitions live in host memory, so they
    leave every phase's GPU total; scoring still gathers one module to the GPU (counted as before)."""
    cfg, layout = get_config("llama2_70b"), Layout(tp=8, dp=8, zero_stage=3, activation_checkpointing=True)
    held = plan_stage("ppo", cfg, layout, hardware=H100_80)
    offloaded = plan_stage("ppo", cfg, layout, shape=StageShape(offload_frozen=True), hardware=H100_80)
    frozen = sum(held.resident[r]["weights"] for r in ("reference", "helpfulness RM", "safety RM"))
    assert frozen > 0 and all(offloaded.resident[r]["weights"] == 0.0
                              for r in ("reference", "helpfulness RM", "safety RM"))
    for phase in held.phases:
        assert held.phase_total(phase) - offloaded.phase_total(phase) == pytest.approx(frozen)
    assert offloaded.phases["scoring"]["ZeRO-3 gathered"] == held.phases["scoring"]["ZeRO-3 gathered"] > 0
    assert any(f"frozen roles in host memory: {frozen / GiB:.1f} GiB" in n for n in offloaded.notes)
    with pytest.raises(ValueError, match="--offload-frozen needs the frozen roles at ZeRO-3"):
        plan_stage("ppo", cfg, layout, shape=StageShape(offload_frozen=True, frozen_zero_stage=1))
    assert launch_main(["plan", "--stage", "ppo", "--model", "llama2_70b", "--gpus", "64", "--gpu-memory", "80GiB",
                        "--tp", "8", "--zero-stage", "3", "--offload-frozen"]) == 0
    assert "frozen roles at ZeRO-3 in host memory" in capsys.readouterr().out


def test_pipeline_plans_for_the_stages_that_run_on_pipeline_stages(capsys: pytest.CaptureFixture[str]) -> None:
    """SFT and DPO run under PP (their objectives have pipeline losses): ``--pp`` plans them at ZeRO-1 with the
    weights split over the stages; the reward model and PPO, which refuse PP, are refused by name."""
    base = ["plan", "--model", "llama2_70b", "--gpus", "64", "--gpu-memory", "80GiB", "--json"]
    for stage in ("sft", "dpo"):
        assert launch_main([*base, "--stage", stage, "--pp", "4"]) == 0
        plans = json.loads(capsys.readouterr().out)["plans"]
        assert plans and all(p["layout"]["pp"] == 4 and p["layout"]["zero_stage"] == 1 for p in plans)
        layout = plans[0]["layout"]
        assert layout["tp"] * layout["pp"] * layout["dp"] == 64
    flat = plan_stage("sft", get_config("llama2_70b"), Layout(tp=8, pp=1, dp=8))
    piped = plan_stage("sft", get_config("llama2_70b"), Layout(tp=8, pp=4, dp=2))
    assert piped.resident["model"]["weights"] < flat.resident["model"]["weights"] / 3  # a stage's share
    for stage in ("rm", "ppo"):
        assert launch_main([*base, "--stage", stage, "--pp", "2"]) == 2
        assert f"the {stage} stage does not run under pipeline parallelism" in capsys.readouterr().err
    assert launch_main([*base, "--stage", "dpo", "--pp", "2", "--zero-stage", "3"]) == 2
    assert "runs ZeRO-1 only" in capsys.readouterr().err
