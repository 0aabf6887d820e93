"""End-to-end pretraining through ``python -m train`` (real DeepSpeed engine, one process, CPU).

- kill -9 at five moments (two of them while a checkpoint is being written), each time ``--resume auto``:
  the final weights and every per-step loss equal an uninterrupted run's, bit for bit, and no checkpoint
  directory on disk is ever unreadable;
- wandb offline: the run directory's ``.wandb`` file holds exactly the logged metrics (read back through
  wandb's own protobuf records), and the console progress lines show the JSONL values;
- ``python -m train.report`` writes the plots and the summary.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.run_checks import assert_honest_mfu
from train.checkpointing import is_complete
from train.portable import PortableCheckpoint

pytestmark = [pytest.mark.slow]

TINY = ["--config", "configs/pretrain/tiny_cpu.toml", "--train.steps=14", "--train.eval_every=7",
        "--checkpoint.every=2", "--checkpoint.keep_last=2", "--train.log_every=1"]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", *TINY, f"--run.dir={run_dir}", *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def _train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def _assert_every_checkpoint_readable(run_dir: Path) -> int:
    root = run_dir / "checkpoints"
    published = [p for p in root.iterdir() if p.name.startswith("step_")] if root.is_dir() else []
    for path in published:
        assert is_complete(path), f"{path} carries a step_ name but is not complete"
        reader = PortableCheckpoint(path)
        assert reader.full_state_dict(), path
        assert not (path / "deepspeed").exists(), f"{path}: DeepSpeed's pickled checkpoint is no longer written"
    return len(published)


def _kill_when(proc: subprocess.Popen, run_dir: Path, *, mid_checkpoint: bool, after_step: int,
               timeout_s: float = 120) -> str:
    """kill -9 ``proc`` once a checkpoint is being written (``.tmp-*`` exists) or once ``after_step`` is logged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "finished"
        ckpts = run_dir / "checkpoints"
        if mid_checkpoint and ckpts.is_dir() and any(p.name.startswith(".tmp-") for p in ckpts.iterdir()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed mid-checkpoint"
        if not mid_checkpoint and (run_dir / "metrics.jsonl").is_file():
            steps = _train_losses_tolerant(run_dir)
            if steps and max(steps) >= after_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return f"killed after step {max(steps)}"
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run neither reached the kill point nor finished")


def _train_losses_tolerant(run_dir: Path) -> list[int]:
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        if rec.get("type") == "train":
            steps.append(rec["step"])
    return steps


@pytest.mark.timeout(600)
def test_kill9_five_times_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    subprocess.run(_cmd(reference), cwd=REPO_ROOT, env=_env(), check=True, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    rng = random.Random(2026)
    # A slow checkpoint write (the test hook sleeps inside the temporary directory) widens the window.
    env = _env(LLAMA_TEST_SLOW_CHECKPOINT="0.4")
    outcomes = []
    for attempt in range(5):
        proc = subprocess.Popen(_cmd(run, "--resume", "auto"), cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mid = attempt in (1, 3)
        done = max(_train_losses_tolerant(run), default=0) if (run / "metrics.jsonl").is_file() else 0
        outcomes.append(_kill_when(proc, run, mid_checkpoint=mid, after_step=done + rng.randint(1, 3)))
        _assert_every_checkpoint_readable(run)
    assert sum(o.startswith("killed") for o in outcomes) == 5, outcomes
    assert sum(o == "killed mid-checkpoint" for o in outcomes) == 2, outcomes
    final = subprocess.run(_cmd(run, "--resume", "auto"), cwd=REPO_ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _assert_every_checkpoint_readable(run) >= 1

    assert _train_losses(run) == _train_losses(reference)  # bit for bit, every step exactly once
    ours = load_file(run / "final_model" / "model.safetensors")
    theirs = load_file(reference / "final_model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(bool((ours[k] == theirs[k]).all()) for k in ours)


def read_wandb_history(run_file: Path) -> list[dict[str, float]]:
    """History rows of a ``.wandb`` transaction log, parsed with wandb's own protobuf ``Record``.

    The file is wandb's LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
    records in 32 KiB blocks, each chunk with a 7-byte header (crc32c, length, type FULL/FIRST/MIDDLE/LAST).
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{run_file}: not a wandb transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.mark.timeout(300)
def test_wandb_offline_and_console_show_the_jsonl_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {k: v for k, v in _env(NETRC=str(tmp_path / "no-netrc")).items()
           if k not in ("WANDB_MODE", "WANDB_API_KEY")}  # no login anywhere: offline mode must be chosen
    proc = subprocess.run(_cmd(run, "--train.steps=6", "--logging.wandb=true"), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["type"] == "train"}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(key in r for r in train.values()), key
    assert_honest_mfu(run, max_tokens_per_step=8 * 64)  # tiny_cpu.toml: 8 sequences of 64; MFU in (0, 100%]

    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, "wandb must run offline (no login) inside the run directory"
    rows = {int(r["_step"]): r for r in read_wandb_history(Path(files[0]))}
    assert sorted(rows) == sorted(train)
    for step, rec in train.items():
        for key in ("loss", "lr", "grad_norm", "mfu", "tokens_per_s"):
            assert rows[step][f"train/{key}"] == pytest.approx(rec[key], rel=1e-12), (step, key)
    validation = [r for r in records if r["type"] == "validation"]
    assert validation and rows[validation[-1]["step"]]["val/loss"] == pytest.approx(validation[-1]["val_loss"])

    shown = re.findall(r"step (\d+)/6 \| loss ([0-9.]+) \| lr ([0-9.e+-]+) \| gnorm ([0-9.]+)", proc.stdout)
    assert [int(s) for s, *_ in shown] == sorted(train)
    for step, loss, lr, gnorm in shown:
        rec = train[int(step)]
        assert (loss, lr, gnorm) == (f"{rec['loss']:.4f}", f"{rec['lr']:.2e}", f"{rec['grad_norm']:.3f}")

    report = subprocess.run([sys.executable, "-m", "train.report", str(run)], cwd=REPO_ROOT, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    pngs = sorted((run / "report").glob("*.png"))
    assert len(pngs) >= 3 and all(p.stat().st_size > 5000 for p in pngs), pngs
    summary = (run / "report" / "summary.md").read_text()
    assert f"{train[6]['loss']:.4f}" in summary


@pytest.mark.timeout(300)
def test_nonfinite_step_is_skipped_by_the_engine_then_repeated_ones_abort(tmp_path: Path) -> None:
    run = tmp_path / "nan"
    proc = subprocess.run(_cmd(run, "--train.steps=5", "--checkpoint.every=1", "--checkpoint.keep_last=5"),
                          cwd=REPO_ROOT, env=_env(LLAMA_TEST_NAN_STEPS="3"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "train"}
    assert records[3]["skipped"] and records[3]["skipped_total"] == 1
    assert all(not records[s]["skipped"] for s in (1, 2, 4, 5)) and records[5]["skipped_total"] == 1
    before, after = (PortableCheckpoint(run / "checkpoints" / f"step_{s:08d}") for s in (2, 3))
    assert after.adam_step == before.adam_step == 2, "the poisoned step must not reach the optimizer"
    assert all(bool((before.full(n) == after.full(n)).all()) for n in before.names())
    assert "SKIPPED (non-finite)" in proc.stdout

    abort = subprocess.run(_cmd(tmp_path / "abort", "--train.steps=8", "--train.max_consecutive_nonfinite=3"),
                           cwd=REPO_ROOT, env=_env(LLAMA_TEST_NAN_STEPS="2,3,4"), capture_output=True, text=True,
                           timeout=240)
    assert abort.returncode == 3, abort.stderr[-2000:]
    assert "3 consecutive steps with a non-finite loss or gradient norm" in abort.stderr


@pytest.mark.timeout(600)
def test_async_write_overlaps_training_kill_and_damage_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """The checkpoint write runs while training goes on; a kill -9 in it leaves the previous `latest`; a truncated
    file in the newest checkpoint makes the resume fall back to the one before, with a warning naming the file."""
    reference = tmp_path / "uninterrupted"
    subprocess.run(_cmd(reference), cwd=REPO_ROOT, env=_env(), check=True, capture_output=True, timeout=300)
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, "--resume", "auto"), cwd=REPO_ROOT, env=_env(LLAMA_TEST_SLOW_CHECKPOINT="1.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, overlapped, deadline = run / "checkpoints", False, time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        writing = ckpts.is_dir() and [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-step_")]
        if writing and (run / "metrics.jsonl").is_file():
            being_written = int(writing[0].split("_")[1].split("-")[0])
            if max(_train_losses_tolerant(run), default=0) > being_written:
                overlapped = True  # a later step finished while this checkpoint was still being written
                if being_written >= 6:
                    latest_before = (ckpts / "latest").read_text()
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    break
        time.sleep(0.01)
    assert overlapped and proc.returncode == -signal.SIGKILL, "never saw training run ahead of a checkpoint write"
    assert (ckpts / "latest").read_text() == latest_before
    newest = sorted(p for p in ckpts.iterdir() if p.name.startswith("step_"))[-1]
    assert f"{newest.name}\n" == latest_before
    victim = newest / "portable" / "tp00-pp00-dp000.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    final = subprocess.run(_cmd(run, "--resume", "auto"), cwd=REPO_ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"skipping damaged checkpoint {newest}" in final.stderr and str(victim) in final.stderr
    assert _train_losses(run) == _train_losses(reference)
    ours = load_file(run / "final_model" / "model.safetensors")
    theirs = load_file(reference / "final_model" / "model.safetensors")
    assert all(bool((ours[k] == theirs[k]).all()) for k in ours)
