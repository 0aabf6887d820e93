"""The data pre-flight (issue 23 item 7): before anything is allocated, the megatron sample index that
``train.steps x train.global_batch_size`` sequences of ``data.seq_len`` would need from a prepared ``data.path``
(epochs per source, index bytes) is computed from the ``.idx`` files alone; a run whose index cannot fit is
refused with the file, the keys and the fix instead of a raw allocation error mid-start.

The plan is checked against what megatron really builds (epochs = document-index length / documents, sample-index
rows) for one source and a blend, at one epoch and at many."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loader import build_pretrain_datasets, sample_index_plan
from data_pipeline.shard_io import mcore_datasets
from tests.conftest import REPO_ROOT
from train.config import RunConfig
from train.config_reader import ConfigError
from train.preflight import check_data

pytestmark = pytest.mark.timeout(120)
TOK = {"vocab_size": 512, "eos_id": 2, "bos_id": 1, "pad_id": 0}


def _prepared(root: Path, docs_per_source: dict[str, int]) -> Path:
    """A ``data_pipeline prepare``-shaped directory: one .bin/.idx per source (documents of 20-59 tokens, EOS
    last) and manifest.json with their counts."""
    mc = mcore_datasets()
    rng = np.random.default_rng(0)
    sources = {}
    for name, n in docs_per_source.items():
        builder = mc.IndexedDatasetBuilder(str(root / f"{name}.bin"), dtype=np.uint16)
        tokens = 0
        for _ in range(n):
            doc = np.append(rng.integers(3, 512, size=int(rng.integers(19, 59))), 2).astype(np.uint16)
            builder.add_document(doc, [len(doc)])
            tokens += len(doc)
        builder.finalize(str(root / f"{name}.idx"))
        sources[name] = {"prefix": name, "tokens": tokens, "documents": n}
    (root / "manifest.json").write_text(json.dumps({"manifest_version": 1, "complete": True, "tokenizer": TOK,
                                                    "dtype": "uint16", "sources": sources}))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepared(tmp_path_factory.mktemp("prepared"), {"wiki": 120, "c4": 40})


@pytest.mark.parametrize("n_train", [50, 3000])  # ~0.3 epochs of the blend, and many epochs of both sources
def test_plan_equals_what_megatron_builds(data: Path, tmp_path: Path, n_train: int) -> None:
    seq, split = 64, "90,10,0"
    plan = sample_index_plan(data_dir_or_blend=data, seq_len=seq, split=split, num_samples=(n_train, 8, 0))
    train, valid, _ = build_pretrain_datasets(data_dir_or_blend=data, seq_len=seq, seed=1, split=split,
                                              num_samples=(n_train, 8, 0), tokenizer_info=TOK,
                                              cache_dir=tmp_path / "cache")
    built = {("train", n): d for n, d in zip(("wiki", "c4"), train.datasets)}
    built |= {("valid", n): d for n, d in zip(("wiki", "c4"), valid.datasets)}
    assert {(r["split"], r["source"]) for r in plan} == set(built)
    for row in plan:
        ds = built[(row["split"], row["source"])]
        assert len(ds.document_index) == row["epochs"] * row["documents"], row
        assert int(ds.dataset.sequence_lengths[ds.indices].sum()) == row["tokens"]
        assert len(ds.sample_index) - 1 == (row["epochs"] * row["tokens"] - 1) // seq >= row["samples"]
        assert len(ds) >= row["samples"]  # megatron serves at least what the plan says it asks for
        real = ds.document_index.nbytes + ds.sample_index.nbytes + ds.shuffle_index.nbytes
        assert real <= row["index_bytes"] <= 4 * real + 10 * row["samples"]  # the peak, not just the results
    epochs = {r["source"]: r["epochs"] for r in plan if r["split"] == "train"}
    assert (max(epochs.values()) == 1) if n_train == 50 else (min(epochs.values()) > 10)


def _cfg(data: Path, *overrides: str) -> RunConfig:
    return RunConfig.from_toml(REPO_ROOT / "configs/pretrain/tiny_cpu.toml", [
        "--data.synthetic=false", f"--data.path={data}", "--data.split=90,10,0", *overrides])


def test_a_run_that_fits_prints_its_epochs_and_index(data: Path) -> None:
    lines = check_data(_cfg(data), _cfg(data).model_config(), world_size=1)
    assert len(lines) == 2 and lines[0].startswith("data train (320 sequences of 64): wiki ") and "index ~" in lines[0]
    assert check_data(_cfg(data, "--data.synthetic=true"), None, world_size=1) == []  # nothing to check
    assert check_data(_cfg(data, "--train.preflight=false"), None, world_size=1) == []


def test_an_index_that_cannot_fit_is_refused_with_the_keys_and_the_fix(data: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import train.preflight as preflight

    monkeypatch.setattr(preflight, "machine_memory", lambda: (2.0**30, "CPU RAM (test)"))
    cfg = _cfg(data, "--train.steps=400000", "--train.global_batch_size=64")  # 1.6G tokens of a 6K-token corpus
    with pytest.raises(ConfigError) as err:
        check_data(cfg, cfg.model_config(), world_size=1)
    msg = str(err.value)
    assert msg.startswith(f"data.path={str(data)!r}: the train split of source ")
    assert "train.steps=400000 x train.global_batch_size=64 sequences of data.seq_len=64" in msg
    assert "epochs" in msg and "megatron's sample indices need ~" in msg and "this machine has 1 GiB (CPU RAM (test))" in msg
    steps = int(msg.split("Use --train.steps=")[1].split()[0])
    one_pass = int(msg.split("one pass over the data is ")[1].split()[0])
    assert 1 <= one_pass < steps < 400000 and "prepare more data" in msg and "--train.preflight=false" in msg
    fixed = _cfg(data, f"--train.steps={steps}", "--train.global_batch_size=64")
    assert check_data(fixed, fixed.model_config(), world_size=1)  # the steps it names fit
    once = _cfg(data, f"--train.steps={one_pass}", "--train.global_batch_size=64")
    assert " x 1 epoch(s), " in check_data(once, once.model_config(), world_size=1)[0]  # one pass is one epoch


def test_a_split_without_documents_is_refused(tmp_path: Path) -> None:
    """3 documents at data.split 98,1,1: the valid split gets none (megatron would loop forever computing its
    epochs); the pre-flight names the file, data.split and the fix."""
    three = _prepared(tmp_path, {"tiny": 3})
    cfg = _cfg(three, "--data.split=98,1,1")
    with pytest.raises(ConfigError, match=r"the valid split of source 'tiny' \(.*tiny.idx, data.split='98,1,1'\) "
                                          r"has 0 documents and no tokens; prepare more data or change data.split"):
        check_data(cfg, cfg.model_config(), world_size=1)
    assert check_data(_cfg(three, "--train.eval_every=0", "--data.split=98,1,1"), cfg.model_config(), world_size=1)


def test_python_m_train_refuses_before_allocating(data: Path, tmp_path: Path) -> None:
    """The CLI: one ``error:`` line (no traceback), exit 2, no run directory written, in seconds."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "configs/pretrain/tiny_cpu.toml",
                           "--data.synthetic=false", f"--data.path={data}", "--data.split=90,10,0",
                           "--train.steps=10000000000", f"--run.dir={tmp_path / 'run'}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1, proc.stderr
    assert "would be repeated" in proc.stderr and "Use --train.steps=" in proc.stderr
    assert not (tmp_path / "run").exists()
