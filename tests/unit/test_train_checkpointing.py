"""Checkpoint publication and resume: atomic rename, COMPLETE marker, `latest` last, keep-last-K, crash leftovers,
integrity records and fallback past damaged checkpoints, RNG state as JSON, asynchronous writes (also with two
ranks simulated by threads).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import threading
from pathlib import Path

import pytest
import torch

from train.checkpointing import CheckpointError, CheckpointManager, is_complete

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


# ---------------------------------------------------------------------------------------------------
# integrity
# ---------------------------------------------------------------------------------------------------
def test_meta_records_every_file_and_complete_seals_meta(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    path = _save(mgr, 2)
    files = json.loads((path / "meta.json").read_text())["files"]
    assert set(files) == {"engine.json", "rng/rank_00000.json"}
    assert files["engine.json"]["bytes"] == (path / "engine.json").stat().st_size
    assert len(files["engine.json"]["sha256"]) == 64
    assert (path / "COMPLETE").read_text().startswith("sha256 ")
    assert mgr.verify(path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_latest_falls_back_with_a_warning_naming_it(tmp_path: Path, damage: str) -> None:
    warnings: list[str] = []
    mgr = CheckpointManager(tmp_path, keep_last=3, warn=warnings.append)
    for step in (2, 4):
        _save(mgr, step)
    target = mgr.root / "step_00000004" / ("meta.json" if damage == "meta" else "engine.json")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[:-3])
    elif damage == "flip":
        target.write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])
    else:
        target.write_text(data.decode().replace('"step": 4', '"step": 4, "x": 1'))
    found = mgr.find_resume("auto")
    assert found.name == "step_00000002"
    assert len(warnings) == 1 and str(target) in warnings[0] and "falling back" in warnings[0]
    assert [p.name.startswith("damaged-step_00000004") for p in mgr.damaged()] == [True]
    assert (mgr.root / "latest").read_text() == "step_00000002\n"
    assert mgr.find_resume("auto").name == "step_00000002" and len(warnings) == 1  # set aside once, not again


def test_only_damaged_checkpoints_exit_unless_fresh_start_is_asked(tmp_path: Path) -> None:
    warnings: list[str] = []
    mgr = CheckpointManager(tmp_path, warn=warnings.append)
    path = _save(mgr, 2)
    (path / "rng" / "rank_00000.json").unlink()
    with pytest.raises(CheckpointError, match=r"damaged-step_00000002.*--resume auto-or-fresh"):
        mgr.find_resume("auto")
    assert "rank_00000.json: missing" in warnings[0]
    with pytest.raises(CheckpointError):  # a requeued job gets the same answer, not a silent fresh start
        mgr.find_resume("auto")
    assert mgr.find_resume("auto-or-fresh") is None and "starting fresh" in warnings[-1]
    fresh = CheckpointManager(tmp_path / "new")
    assert fresh.find_resume("auto") is None  # nothing saved yet: a first start
    _save(mgr, 1)  # the fresh run's checkpoints count again, and keep_last ignores the damaged one
    assert mgr.find_resume("auto").name == "step_00000001"


def test_an_explicit_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    path = _save(mgr, 2)
    (path / "engine.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"engine\.json.*damaged|damaged.*engine\.json"):
        mgr.find_resume(str(path))


def test_rng_is_json_and_an_old_pickle_is_never_unpickled(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    path = _save(mgr, 2)
    state = json.loads((path / "rng" / "rank_00000.json").read_text())
    assert set(state) >= {"python", "numpy", "torch"}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _save(mgr, 3)
    torch.rand(5)
    mgr.load(mgr.root / "step_00000003", engine=FileEngine())
    assert torch.equal(torch.rand(3), expected)
    # An older checkpoint's pickled RNG file, replaced by an exploit: skipped, never loaded.
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (path / "rng" / "rank_00000.json").unlink()
    (path / "rng" / "rank_00000.pkl").write_bytes(pickle.dumps(Exploit()))
    warnings: list[str] = []
    CheckpointManager(tmp_path, warn=warnings.append).load(path, engine=FileEngine())
    assert not marker.exists() and "not read" in warnings[0]


# ---------------------------------------------------------------------------------------------------
# asynchronous save
# ---------------------------------------------------------------------------------------------------
class StagedEngine(FileEngine):
    """``stage_save`` copies the state now and returns a writer that blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.fail = False

    def stage_save(self, path: Path, client_state: dict):
        snapshot = dict(client_state)

        def write() -> dict:
            self.release.wait(timeout=30)
            if self.fail:
                raise OSError("No space left on device")
            from model.checkpoints.streaming import hash_file

            (Path(path) / "engine.json").write_text(json.dumps(snapshot))
            return {"engine.json": hash_file(Path(path) / "engine.json")}

        return write


def test_async_save_returns_before_the_write_and_publishes_in_order(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    engine = StagedEngine()
    engine.release.set()
    mgr.save(step=2, engine=engine, client_state={"step": 2}, meta={})
    mgr.wait()
    engine.release.clear()
    state = {"step": 4}
    mgr.save(step=4, engine=engine, client_state=state, meta={})
    state["step"] = 99  # training goes on and changes its state: the staged copy is what gets written
    assert (mgr.root / "latest").read_text() == "step_00000002\n"  # not published while writing
    assert any(p.name.startswith(".tmp-step_00000004") for p in mgr.root.iterdir())
    engine.release.set()
    mgr.wait()
    assert (mgr.root / "latest").read_text() == "step_00000004\n"
    assert FileEngine().load(mgr.root / "step_00000004") == {"step": 4}
    assert mgr.verify(mgr.root / "step_00000004") == []


def test_async_write_failure_is_raised_and_nothing_is_published(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    engine = StagedEngine()
    engine.fail = True
    engine.release.set()
    mgr.save(step=2, engine=engine, client_state={}, meta={})
    with pytest.raises(RuntimeError, match="No space left"):
        mgr.wait()
    assert mgr.published() == [] and not (mgr.root / "latest").exists()


def test_two_ranks_rank0_publishes_only_after_every_manifest(tmp_path: Path) -> None:
    barrier = threading.Barrier(2)
    box: dict = {}
    gathered: list = [None, None]

    def broadcast(obj: object) -> object:
        if obj is not None:
            box["v"] = obj
        barrier.wait()
        return box["v"]

    def make_gather(rank: int):
        def all_gather(obj: object) -> list:
            gathered[rank] = obj
            barrier.wait()
            out = list(gathered)
            barrier.wait()
            return out
        return all_gather

    engines = [StagedEngine(), StagedEngine()]
    managers = [CheckpointManager(tmp_path, rank=r, world_size=2, async_save=True, barrier=barrier.wait,
                                  broadcast=broadcast, all_gather=make_gather(r)) for r in range(2)]
    engines[0].release.set()  # rank 1 is slow

    def run(rank: int) -> None:
        managers[rank].save(step=3, engine=_RankEngine(engines[rank], rank), client_state={"r": rank}, meta={})

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    managers[0]._thread.join(timeout=0.5)
    assert managers[0].published() == []  # rank 0 waits for rank 1's manifest
    engines[1].release.set()
    for m in managers:
        m.wait()
    path = managers[0].published()[-1]
    files = json.loads((path / "meta.json").read_text())["files"]
    assert {"rank0.json", "rank1.json", "rng/rank_00000.json", "rng/rank_00001.json"} <= set(files)
    results: list = [None, None]
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, managers[r].find_resume("auto")))
               for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [path, path]


class _RankEngine:
    """Each simulated rank writes its own file name."""

    def __init__(self, inner: StagedEngine, rank: int) -> None:
        self.inner, self.rank = inner, rank

    def stage_save(self, path: Path, client_state: dict):
        def write() -> dict:
            self.inner.release.wait(timeout=30)
            from model.checkpoints.streaming import hash_file

            target = Path(path) / f"rank{self.rank}.json"
            target.write_text(json.dumps(client_state))
            return {target.name: hash_file(target)}

        return write
