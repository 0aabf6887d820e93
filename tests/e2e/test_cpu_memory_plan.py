"""The planner's CPU per-process memory against the peak RSS that real ``python -m train`` runs report.

    pytest tests/e2e/test_cpu_memory_plan.py      # 2 runs of bench_25m (2 steps) + the overhead probe, ~1 min

Both runs and the probe use ``MALLOC_MMAP_THRESHOLD_=131072`` so that resident memory follows live tensors (the
plan's stated assumption; launch/cpu_plan.py explains glibc's default). The two configurations put the peak
in different places: one micro-batch of 8 peaks in backward (activations), four of 2 in the optimizer step
(flat gradients + AdamW temporaries), so both halves of the model are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.__main__ import main
from launch.cpu_plan import measure_runtime_overhead, plan_cpu_process
from model.config import get_config
from tests.e2e.launch_helpers import REPO, TINY, Launched, read_steps, train_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENV = train_env(MALLOC_MMAP_THRESHOLD_="131072")
SEQ, GLOBAL_BATCH = 256, 8
CASES = {  # name: (micro-batch, ZeRO stage, expected peak phase)
    "backward": (8, 1, "backward"),
    "step": (2, 2, "optimizer step"),
}
TOLERANCE = 0.15


def _train_argv(run_dir: Path, *, micro_batch: int, zero: int) -> list[str]:
    return [sys.executable, "-m", "train", "--config", TINY, "--model.name=bench_25m",
            f"--train.micro_batch_size={micro_batch}", f"--train.global_batch_size={GLOBAL_BATCH}",
            f"--data.seq_len={SEQ}", f"--zero.stage={zero}", "--train.steps=2", "--train.eval_every=0",
            "--checkpoint.every=0", f"--run.dir={run_dir}"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Peak RSS (bytes) of each case, and the runtime overhead: the three processes run side by side."""
    tmp = tmp_path_factory.mktemp("cpu_memory")
    runs = {name: Launched.start(_train_argv(tmp / name, micro_batch=mb, zero=zero), log=tmp / f"{name}.log",
                                 env=ENV, cwd=REPO)
            for name, (mb, zero, _) in CASES.items()}
    try:
        overhead = measure_runtime_overhead(zero_stage=1, env=ENV, timeout_s=600)
        for proc in runs.values():
            assert proc.wait(timeout=800) == 0, proc.output()[-3000:]
    finally:
        for proc in runs.values():
            proc.stop()
    peaks = {}
    for name in CASES:
        steps = read_steps(tmp / name)
        assert [r["step"] for r in steps] == [1, 2]
        peaks[name] = steps[-1]["mem_gb"] * 2**30  # ru_maxrss through the last step (train/metrics.py)
    return {"overhead": overhead, "peaks": peaks}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_plan_within_15_percent_of_measured_peak(case: str, measured: dict[str, object]) -> None:
    micro_batch, zero, phase = CASES[case]
    overhead = float(measured["overhead"])  # type: ignore[arg-type]
    assert 100 * 2**20 < overhead < 2 * 2**30, f"implausible runtime overhead {overhead / 2**20:.0f} MiB"
    plan = plan_cpu_process(get_config("bench_25m"), seq_len=SEQ, micro_batch=micro_batch,
                            grad_accum=GLOBAL_BATCH // micro_batch, zero_stage=zero, runtime_overhead=overhead)
    peak = measured["peaks"][case]  # type: ignore[index]
    error = peak / plan.total - 1
    print(f"bench_25m mb {micro_batch} ZeRO-{zero}: plan {plan.total / 2**20:.0f} MiB (overhead "
          f"{overhead / 2**20:.0f} + model {plan.model_bytes / 2**20:.0f}, peak in {plan.phase}), measured "
          f"{peak / 2**20:.0f} MiB: {error:+.1%}")
    assert plan.phase == phase
    assert plan.model_bytes > plan.runtime_overhead  # the model's share dominates: the overhead cannot hide errors
    assert abs(error) < TOLERANCE, f"plan {plan.total / 2**20:.0f} MiB vs measured {peak / 2**20:.0f} MiB"


def test_cli_prints_the_measured_overhead_as_its_own_line(measured: dict[str, object], capsys) -> None:
    overhead = float(measured["overhead"])  # type: ignore[arg-type]
    assert main(["plan", "--device", "cpu", "--model", "bench_25m", "--gpus", "1", "--seq-len", str(SEQ),
                 "--global-batch-tokens", str(SEQ * GLOBAL_BATCH), "--micro-batch", "8", "--zero-stage", "1",
                 "--runtime-overhead", str(int(overhead)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["plan"]
    assert data["runtime_overhead"] == int(overhead) and data["phase"] == "backward"
    assert data["total"] == pytest.approx(data["model_bytes"] + int(overhead))
    out = subprocess.run([sys.executable, "-m", "launch", "plan", "--device", "cpu", "--model", "bench_25m",
                          "--gpus", "1", "--seq-len", str(SEQ), "--global-batch-tokens", str(SEQ * GLOBAL_BATCH),
                          "--micro-batch", "8", "--runtime-overhead", str(int(overhead))],
                         capture_output=True, text=True, check=True, cwd=REPO, timeout=120).stdout
    line = next(x for x in out.splitlines() if x.strip().startswith("runtime overhead (python"))
    assert f"{overhead / 2**20:.0f} MiB" in line
