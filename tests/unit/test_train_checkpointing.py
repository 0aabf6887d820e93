"""Checkpoint publication: atomic rename, COMPLETE marker, `latest` last, keep-last-K, crash leftovers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from train.checkpointing import CheckpointManager, is_complete

pytestmark = pytest.mark.timeout(60)


class FileEngine:
    """Writes one file per save; load returns the client state."""

    def save(self, path: Path, client_state: dict) -> None:
        (Path(path) / "engine.json").write_text(json.dumps(client_state))

    def load(self, path: Path) -> dict:
        return json.loads((Path(path) / "engine.json").read_text())


def _save(mgr: CheckpointManager, step: int) -> Path:
    return mgr.save(step=step, engine=FileEngine(), client_state={"step": step}, meta={"consumed_samples": step})


def test_publish_keep_last_and_latest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        _save(mgr, step)
    assert [p.name for p in mgr.published()] == ["step_00000004", "step_00000006"]
    assert (mgr.root / "latest").read_text() == "step_00000006\n"
    found = mgr.find_resume("auto")
    assert found.name == "step_00000006"
    random.seed(5)
    state = mgr.load(found, engine=FileEngine())
    assert state["step"] == 6 and state["meta"]["consumed_samples"] == 6 and "code_version" in state["meta"]
    assert random.random() != random.Random(5).random()  # RNG restored to the saved state, not the seed
    assert not [p for p in mgr.root.iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_crash_leftovers_and_broken_pointer(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 2)
    _save(mgr, 4)
    # a crash while writing step 6 (no COMPLETE), a step_ dir without marker, and a pointer to garbage
    (mgr.root / ".tmp-step_00000006-abcd").mkdir()
    (mgr.root / ".tmp-step_00000006-abcd" / "engine.json").write_text("{")
    (mgr.root / "latest").write_text("step_00000099\n")
    assert mgr.find_resume("auto").name == "step_00000004"
    # a crash between the rename and the pointer update: latest one behind -> newest complete wins
    (mgr.root / "latest").write_text("step_00000002\n")
    assert mgr.find_resume("auto").name == "step_00000004"
    assert mgr.clean_leftovers() == [".tmp-step_00000006-abcd"]
    (mgr.root / "step_00000004" / "COMPLETE").unlink()
    assert not is_complete(mgr.root / "step_00000004")
    assert mgr.find_resume("auto").name == "step_00000002"
    assert mgr.find_resume("none") is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        mgr.find_resume(str(mgr.root / "step_00000004"))


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 2)
    mgr.save(step=2, engine=FileEngine(), client_state={"step": 2, "again": True}, meta={})
    assert FileEngine().load(mgr.root / "step_00000002")["again"] is True
    assert [p.name for p in mgr.published()] == ["step_00000002"]
