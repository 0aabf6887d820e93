"""Portable checkpoint files: per-rank fragments read slice-wise, legacy files, gaps named, streaming consolidation.

    pytest tests/unit/test_portable.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.config import get_config
from tests.checkpoint_helpers import random_state_dict, tp_dim_of, write_portable_checkpoint
from tests.conftest import REPO_ROOT
from train.portable import DIRNAME, PortableCheckpoint, tp_range

pytestmark = pytest.mark.timeout(180)
CFG = get_config("debug_llama2_tiny")


@pytest.mark.parametrize(("tp", "dp"), [(1, 1), (2, 3), (4, 2)])
def test_fragments_rebuild_every_tensor_and_slice(tmp_path: Path, tp: int, dp: int) -> None:
    state = random_state_dict(CFG, seed=tp * 10 + dp)
    step_dir = write_portable_checkpoint(tmp_path, state, CFG, tp=tp, dp=dp)
    assert len(list((step_dir / DIRNAME).iterdir())) == tp * dp
    reader = PortableCheckpoint(step_dir)
    assert reader.names() == sorted(state)
    for name, full in state.items():
        assert torch.equal(reader.full(name), full), name
        assert torch.equal(reader.full(name, "exp_avg_sq"), full * 3), name
        for dim in range(full.ndim):  # another layout's TP slices, along either dimension
            for rank in range(3):
                start, stop = tp_range(full.shape[dim], rank=rank, size=3)
                assert torch.equal(reader.read_slice(name, "exp_avg", dim=dim, start=start, stop=stop),
                                   (full * 2).narrow(dim, start, stop - start)), (name, dim, rank)


def test_version_1_files_are_still_read(tmp_path: Path) -> None:
    state = random_state_dict(CFG)
    (tmp_path / DIRNAME).mkdir()
    for tp_rank in range(2):
        flat, dims = {}, {}
        for name, full in state.items():
            dim = tp_dim_of(name)
            piece = full if dim is None else full.chunk(2, dim)[tp_rank].contiguous()
            for key, factor in (("param", 1), ("exp_avg", 2), ("exp_avg_sq", 3)):
                flat[f"{key}/{name}"] = piece * factor
            dims[name] = dim
        meta = {"tp_dims": dims, "tp_rank": tp_rank, "pp_rank": 0, "adam_step": 4, "layout": {"tp": 2}}
        save_file(flat, str(tmp_path / DIRNAME / f"tp{tp_rank:02d}-pp00.safetensors"),
                  metadata={"portable": json.dumps(meta)})
    reader = PortableCheckpoint(tmp_path)
    assert reader.adam_step == 4
    for name, full in state.items():
        assert torch.equal(reader.full(name), full), name
        assert torch.equal(reader.read_slice(name, dim=0, start=1, stop=3), full[1:3]), name


def test_a_missing_rank_file_is_named(tmp_path: Path) -> None:
    step_dir = write_portable_checkpoint(tmp_path, random_state_dict(CFG), CFG, tp=2, dp=2)
    (step_dir / DIRNAME / "tp01-pp00-dp001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"TP rank 1.*a rank's file is missing"):
        PortableCheckpoint(step_dir)
    (step_dir / DIRNAME / "tp00-pp00-dp000.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"tp00-pp00-dp000\.safetensors: not a readable portable"):
        PortableCheckpoint(step_dir)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_consolidate_streams_to_sharded_hf_that_transformers_loads(tmp_path: Path, tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = CFG.replace(tie_embeddings=tied)
    state = random_state_dict(cfg, seed=3)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    write_portable_checkpoint(tmp_path / "run", state, cfg, tp=2, dp=2, step=9)
    proc = subprocess.run([sys.executable, "-m", "train.consolidate", "--checkpoint", str(tmp_path / "run"),
                           "--output", str(tmp_path / "hf"), "--format", "hf", "--max-shard-size", "100KB"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checkpoint"].endswith("step_00000009")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    from model.checkpoints import from_pretrained

    ours = from_pretrained(tmp_path / "hf")
    for name, tensor in state.items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, ours(tokens), atol=1e-5)


def test_consolidate_to_meta_and_native(tmp_path: Path) -> None:
    from train.consolidate import consolidate

    state = random_state_dict(CFG, seed=5)
    write_portable_checkpoint(tmp_path / "run", state, CFG, tp=2, dp=1, step=2)
    from model.checkpoints import load_checkpoint

    for fmt in ("native", "meta"):
        consolidate(tmp_path / "run", tmp_path / fmt, format=fmt, dtype=torch.bfloat16)
        _, weights = load_checkpoint(tmp_path / fmt)
        for name, tensor in state.items():
            assert torch.equal(weights[name], tensor.bfloat16()), (fmt, name)


def test_consolidate_peak_memory_is_about_one_tensor_not_the_model(tmp_path: Path) -> None:
    """The CI-sized variant of benchmarks/bench_checkpoint_memory.py (consolidate section)."""
    from model.config import LlamaConfig

    cfg = LlamaConfig(name="deep_narrow", dim=256, n_layers=40, n_heads=4, vocab_size=8000, multiple_of=64,
                      max_seq_len=64).validate()
    state = random_state_dict(cfg)
    largest = max(t.numel() * 4 for t in state.values())
    total = sum(t.numel() * 4 for t in state.values())
    write_portable_checkpoint(tmp_path / "run", state, cfg, tp=2, dp=2)
    del state
    code = f"""
import json
from train.consolidate import consolidate
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
consolidate({str(tmp_path / 'run')!r}, {str(tmp_path / 'hf')!r}, format="hf")
print(json.dumps([base, status("VmHWM:")]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    base, peak = json.loads(proc.stdout.splitlines()[-1])
    assert total > 12 * largest
    assert peak - base <= 3 * largest + 16 * 2**20, (
        f"consolidation grew by {(peak - base) / 2**20:.1f} MiB; largest tensor {largest / 2**20:.1f} MiB, "
        f"model {total / 2**20:.1f} MiB")


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 2), (1, 2), (2, 1), (2, 4), (4, 2)])
def test_tp_fragments_of_another_layout(tmp_path: Path, src_tp: int, dst_tp: int) -> None:
    """What a rank of the target layout restores: elements lo:hi of its own TP slice, for every dimension."""
    state = random_state_dict(CFG, seed=src_tp * 7 + dst_tp)
    reader = PortableCheckpoint(write_portable_checkpoint(tmp_path, state, CFG, tp=src_tp, dp=3))
    for name, full in state.items():
        dim = tp_dim_of(name) if dst_tp > 1 else None
        for rank in range(dst_tp):
            start, stop = (0, 0) if dim is None else tp_range(full.shape[dim], rank=rank, size=dst_tp)
            region = full if dim is None else full.narrow(dim, start, stop - start)
            flat = (region * 3).reshape(-1)
            for lo, hi in ((0, flat.numel()), (5, flat.numel() // 2), (flat.numel() - 3, flat.numel())):
                got = reader.read_tp_fragment(name, "exp_avg_sq", tp_dim=dim, start=start, stop=stop,
                                              tp_size=dst_tp, lo=lo, hi=hi)
                assert torch.equal(got, flat[lo:hi]), (name, rank, lo, hi)
