"""Context-parallel training on CPU/gloo equals one process (issue 22's acceptance), through the real loop.

Two ``torchrun`` launches of ``run_layouts.py`` (the parity worker; ``parity_config``: ``debug_tiny``, 64-token
sequences of packed 4-47-token synthetic documents with the document mask, so documents cross the 16-token
chunks of CP 2 and the 8-token chunks of CP 4):

- 2 processes: CP 2 (checkpoint at step 3), then CP 1 x DP 2 resumed from that checkpoint (checkpoints do not
  see CP: ZeRO's partitions span DP x CP, so the CP 2 checkpoint reads like a DP 2 one); TP 2 with sequence
  parallelism (``model/sequence_parallel.py``);
- 4 processes: CP 4, TP 2 x CP 2 (with sequence parallelism, the default at TP > 1), CP 2 x PP 2 (the stages carry the chunks, RoPE uses their global positions),
  CP 2 x DP 2 with ZeRO-3.

Every layout's 5 losses and gradient norms and its final weights equal ``train.reference.ReferenceEngine`` (one
process, plain PyTorch) within 1e-5; the resumed run's steps 4 and 5 too.
"""

from __future__ import annotations

import pytest

from tests.distributed.parity_config import parity_config
from tests.distributed.test_parity import TOL, _launch, _max_weight_diff, _metrics
from train.loop import train
from train.reference import ReferenceEngine, single_process_topology

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TWO_PROCESS = {"cp2": ["--parallel.cp=2", "--checkpoint.every=3"],
               "tp2_sp": ["--parallel.tp=2", "--parallel.sequence_parallel=true"]}
FOUR_PROCESS = {"cp4": ["--parallel.cp=4"], "tp2_cp2": ["--parallel.tp=2", "--parallel.cp=2"],
                "cp2_pp2": ["--parallel.cp=2", "--parallel.pp=2"],
                "cp2_dp2_zero3": ["--parallel.cp=2", "--zero.stage=3"]}
RESUME = "resume_cp1_dp2_from_cp2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("context_parallel_training")
    train(parity_config([f"--run.dir={out / 'reference'}"]), engine_factory=ReferenceEngine,
          topology_factory=single_process_topology, print_fn=lambda *a, **k: None)
    resume = [f"--run.resume={out / 'cp2' / 'checkpoints' / 'step_00000003'}"]
    _launch(out, 2, {"cp2": TWO_PROCESS["cp2"], RESUME: resume, "tp2_sp": TWO_PROCESS["tp2_sp"]})
    _launch(out, 4, FOUR_PROCESS)
    return out


@pytest.mark.parametrize("layout", [*TWO_PROCESS, *FOUR_PROCESS])
def test_context_parallel_layout_matches_single_process(runs, layout: str) -> None:
    ours, ref = _metrics(runs / layout), _metrics(runs / "reference")
    assert sorted(ours) == [1, 2, 3, 4, 5]
    for step, record in ours.items():
        assert abs(record["loss"] - ref[step]["loss"]) <= TOL, (layout, step, record["loss"], ref[step]["loss"])
        assert abs(record["grad_norm"] - ref[step]["grad_norm"]) <= TOL, (layout, step)
    assert _max_weight_diff(runs / layout, runs / "reference") <= TOL


def test_sequence_parallel_runs_with_context_parallelism(runs) -> None:
    """TP 2 x CP 2 runs sequence parallelism by default (each rank's two CP chunks split over TP)."""
    import json

    ran = {name: json.loads((runs / name / "kernels.json").read_text())["sequence_parallel"]
           for name in [*TWO_PROCESS, *FOUR_PROCESS]}
    assert {name for name, sp in ran.items() if sp} == {"tp2_sp", "tp2_cp2"}, ran


def test_cp_ranks_sit_inside_pp_ranks(runs) -> None:
    """CP 2 x PP 2 on 4 processes: CP on adjacent ranks, PP outside it ([TP, CP, PP, DP])."""
    import json

    got = {int(p.stem.removeprefix("coordinates_rank")): json.loads(p.read_text())
           for p in (runs / "cp2_pp2").glob("coordinates_rank*.json")}
    assert {r: (c["cp"], c["pp"]) for r, c in got.items()} == {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}


def test_resume_cp2_checkpoint_at_cp1(runs) -> None:
    resumed, ref = _metrics(runs / RESUME), _metrics(runs / "reference")
    assert sorted(resumed) == [4, 5], "the resumed run starts after the step-3 checkpoint"
    for step in (4, 5):
        assert abs(resumed[step]["loss"] - ref[step]["loss"]) <= TOL, (step, resumed[step], ref[step])
    assert _max_weight_diff(runs / RESUME, runs / "reference") <= TOL
