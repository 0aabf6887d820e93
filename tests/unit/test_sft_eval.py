"""``rlhf.sft``'s held-out evaluation runs on the engine, every rank its shard (no whole-model load on rank 0).

One process (``ReferenceEngine``): ``sft_eval.json`` equals the whole-model reference (``heldout_loss`` of the
initial model and of the exported final model). The dealing of held-out rows over DP ranks covers every row once
with the same number of micro-batches per rank. The sharded layouts (TP2, DP2 x ZeRO-3, PP2) are compared with
the single process in ``tests/distributed/test_rlhf_parity.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.timeout(180)


def test_sft_eval_on_the_engine_equals_the_whole_model_reference(tmp_path: Path) -> None:
    from model.checkpoints import from_pretrained
    from rlhf.sft.train import BEFORE_FILE, SFTTask, heldout_loss, initial_model, run_sft
    from tests.distributed.rlhf_parity_config import make_parity_data, rlhf_parity_config
    from train.reference import ReferenceEngine, single_process_topology

    data = make_parity_data(tmp_path / "data")
    cfg = rlhf_parity_config("sft", data, [f"--run.dir={tmp_path / 'sft'}", "--train.steps=2"])
    task = SFTTask(cfg)
    _, evaluation = run_sft(cfg, task=task, engine_factory=ReferenceEngine, topology_factory=single_process_topology,
                            print_fn=lambda *a, **k: None)
    written = json.loads((tmp_path / "sft" / "sft_eval.json").read_text())
    assert written == evaluation and written["heldout_rows"] == len(task.valid_set) > 0
    before = heldout_loss(initial_model(cfg, task), task.valid_set)
    after = heldout_loss(from_pretrained(tmp_path / "sft" / "final_model"), task.valid_set)
    assert abs(written["heldout_loss_before"] - before["loss"]) <= 1e-5
    assert abs(written["heldout_loss_after"] - after["loss"]) <= 1e-5
    assert written["heldout_answer_tokens"] == before["tokens"]
    assert written["heldout_loss_after"] < written["heldout_loss_before"] - 1e-3  # trained: not the same model
    # "before" was measured on the engine before its first step, not on a second model built at the end
    saved = json.loads((tmp_path / "sft" / BEFORE_FILE).read_text())
    assert saved["heldout_loss_before"] == written["heldout_loss_before"]
    # A run resumed from a checkpoint without that file (older runs) rebuilds the initial model: the same figure.
    (tmp_path / "sft" / BEFORE_FILE).unlink()
    cfg3 = rlhf_parity_config("sft", data, [f"--run.dir={tmp_path / 'sft'}", "--train.steps=3",
                                            "--run.resume=auto"])
    _, resumed = run_sft(cfg3, task=SFTTask(cfg3), engine_factory=ReferenceEngine,
                         topology_factory=single_process_topology, print_fn=lambda *a, **k: None)
    assert not (tmp_path / "sft" / BEFORE_FILE).exists()  # a resumed run measures nothing before its steps
    assert abs(resumed["heldout_loss_before"] - before["loss"]) <= 1e-5


def test_heldout_rows_are_dealt_once_over_dp_ranks_with_equal_batch_counts() -> None:
    from rlhf.sft.train import engine_heldout_loss

    rows = [{"input_ids": torch.full((4,), i), "labels": torch.full((4,), i), "loss_mask": torch.ones(4),
             "document_ids": torch.zeros(4, dtype=torch.long)} for i in range(7)]
    seen: dict[int, list] = {}

    class Recorder:
        def eval_loss(self, batches, num_batches):
            seen[rank] = [next(batches) for _ in range(num_batches)]
            return 0.0

    for rank in range(2):
        engine_heldout_loss(Recorder(), rows, topology=SimpleNamespace(dp_size=2, dp_rank=rank), micro_batch_size=3)
    assert len(seen[0]) == len(seen[1]) == 2  # ceil(ceil(7 / 2) / 3)
    counted = [int(ids[0]) for r in seen.values() for b in r for ids, mask in zip(b["input_ids"], b["loss_mask"])
               if mask.sum() > 0]
    assert sorted(counted) == list(range(7))  # every row once; the padding rows weigh nothing
