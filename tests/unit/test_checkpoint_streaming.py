"""Streaming checkpoint I/O: one tensor in memory at a time, slice-wise reads, and a Meta export that Meta's own
loaders accept.

    pytest tests/unit/test_checkpoint_streaming.py

Meta's reference code is not vendored: ``MetaArgsLlama2`` / ``MetaArgsLlama3`` / ``MetaArgsLlamaModels`` copy the
``ModelArgs`` fields of meta-llama/llama (``llama/model.py``), meta-llama/llama3 (``llama/model.py``) and
meta-llama/llama-models (``models/llama3/args.py``, which keeps only known keys), and ``meta_build_args`` makes
the exact call of their ``Llama.build``: ``ModelArgs(max_seq_len=..., max_batch_size=..., **params)``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from model.checkpoints import open_checkpoint, save_checkpoint, write_checkpoint
from model.checkpoints.meta import load_meta, params_from_config
from model.checkpoints.reader import MemoryReader
from model.checkpoints.streaming import (
    TensorSpec,
    hash_file,
    parse_size,
    specs_of,
    verify_file,
    write_safetensors,
    write_torch_file,
)
from model.config import LlamaConfig, RopeScaling, get_config
from model.llama import Llama, init_llama_weights
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(120)

LLAMA2 = get_config("debug_llama2_tiny")
LLAMA3 = get_config("debug_llama3_tiny").replace(rope_scaling=None)
LLAMA31 = get_config("debug_llama3_tiny").replace(
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192))


def _model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    model = Llama(cfg)
    init_llama_weights(model, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------------
SAMPLE = {"a": torch.randn(3, 4), "b": torch.arange(10).to(torch.bfloat16), "c": torch.randn(5).half(),
          "empty": torch.zeros(0, 3), "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3)}


def test_safetensors_writer_round_trip_and_record(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    record = write_safetensors(path, specs_of(SAMPLE.items()), SAMPLE.__getitem__, metadata={"k": "v"})
    assert record == hash_file(path) and record.bytes == path.stat().st_size
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "k": "v"}
        for name, tensor in SAMPLE.items():
            assert torch.equal(fh.get_tensor(name), tensor) and fh.get_tensor(name).dtype == tensor.dtype
        assert torch.equal(fh.get_slice("a")[:, 1:3], SAMPLE["a"][:, 1:3])
    assert verify_file(path, record.to_dict()) is None


def test_writers_refuse_a_tensor_that_breaks_the_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'a' arrived with shape \[3, 5\].*promised \[3, 4\]"):
        write_safetensors(tmp_path / "x.safetensors", [TensorSpec("a", (3, 4), torch.float32)],
                          lambda name: torch.zeros(3, 5))


def test_torch_writer_loads_with_weights_only_and_mmap(tmp_path: Path) -> None:
    path = tmp_path / "consolidated.00.pth"
    record = write_torch_file(path, specs_of(SAMPLE.items()), SAMPLE.__getitem__)
    assert record == hash_file(path)
    for kwargs in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
        loaded = torch.load(path, map_location="cpu", **kwargs)
        assert type(loaded) is dict and list(loaded) == list(SAMPLE)
        for name, tensor in SAMPLE.items():
            assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype, name


@pytest.mark.parametrize("writer", [write_safetensors, write_torch_file], ids=["safetensors", "pth"])
def test_writers_hold_one_tensor_at_a_time(tmp_path: Path, writer: Any) -> None:
    """Every tensor fetched earlier is garbage by the time the next is asked for."""
    alive: list[weakref.ref] = []

    def fetch(name: str) -> torch.Tensor:
        gc.collect()
        assert not [r for r in alive if r() is not None], f"an earlier tensor is still held when {name} is read"
        tensor = torch.full((64, 64), float(len(alive)))
        alive.append(weakref.ref(tensor))
        return tensor

    specs = [TensorSpec(f"t{i}", (64, 64), torch.float32) for i in range(6)]
    writer(tmp_path / "out", specs, fetch)
    assert len(alive) == 6


def test_verify_file_names_truncation_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    record = write_safetensors(path, specs_of(SAMPLE.items()), SAMPLE.__getitem__).to_dict()
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    assert "truncated" in verify_file(path, record) and str(path) in verify_file(path, record)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "SHA-256" in verify_file(path, record)
    assert verify_file(path, record, checksum=False) is None
    path.unlink()
    assert "missing" in verify_file(path, record)


def test_parse_size_uses_hugging_face_units() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100MB") == 10**8
    with pytest.raises(ValueError, match="not a size"):
        parse_size("5 parsecs")


# ---------------------------------------------------------------------------------------------------
# sharded native / HF, slice-wise readers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["native", "hf"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sharded_write_and_slice_reads(tmp_path: Path, fmt: str, tied: bool) -> None:
    cfg = LLAMA2.replace(tie_embeddings=tied)
    model = _model(cfg)
    state = model.state_dict()
    out = write_checkpoint(MemoryReader(cfg, state, source="test"), cfg, tmp_path / fmt, format=fmt,
                           max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    per_file = {f: [n for n, g in index["weight_map"].items() if g == f] for f in files}
    assert len(files) > 2
    for file_name, names in per_file.items():  # over the limit only as a lone tensor larger than it
        assert len(names) == 1 or (out / file_name).stat().st_size <= 60_000 + 4096, (file_name, names)
    stored = sum(t.numel() * 4 for n, t in state.items() if not (tied and n == "output.weight"))
    assert index["metadata"]["total_size"] == stored
    reader = open_checkpoint(out)
    assert (reader.cfg.ffn_dim, reader.cfg.kv_heads, reader.cfg.tie_embeddings) == (cfg.ffn_dim, cfg.kv_heads, tied)
    for name, tensor in state.items():
        assert torch.equal(reader.read(name), tensor), name
        dim = 1 if name.endswith(("wo.weight", "w2.weight")) else 0
        if tensor.ndim == 2:
            half = tensor.shape[dim] // 2
            assert torch.equal(reader.read_slice(name, dim=dim, start=half, stop=tensor.shape[dim]),
                               tensor.narrow(dim, half, tensor.shape[dim] - half)), name


def test_from_pretrained_reads_a_sharded_native_checkpoint(tmp_path: Path) -> None:
    from model.checkpoints import from_pretrained

    model = _model(LLAMA2, seed=4)
    write_checkpoint(MemoryReader(LLAMA2, model.state_dict(), source="t"), LLAMA2, tmp_path / "n",
                     max_shard_bytes=100_000)
    assert json.loads((tmp_path / "n" / "config.json").read_text())["format_version"] == 2
    tokens = torch.randint(0, LLAMA2.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "n")(tokens), model(tokens))


# ---------------------------------------------------------------------------------------------------
# Meta export, checked against Meta's own ModelArgs handling
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MetaArgsLlama2:  # meta-llama/llama, llama/model.py
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048


@dataclasses.dataclass
class MetaArgsLlama3:  # meta-llama/llama3, llama/model.py
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000
    max_batch_size: int = 32
    max_seq_len: int = 2048


class MetaArgsLlamaModels(MetaArgsLlama3):  # meta-llama/llama-models, models/llama3/args.py
    use_scaled_rope: bool = False

    def __init__(self, **kwargs: Any) -> None:  # their __init__: set known attributes, ignore the rest
        for key, value in kwargs.items():
            if hasattr(self, key):
                setattr(self, key, value)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads


def meta_build_args(args_cls: type, ckpt_dir: Path) -> Any:
    """What ``Llama.build`` does with params.json (all three repositories)."""
    params = json.loads((ckpt_dir / "params.json").read_text())
    return args_cls(max_seq_len=512, max_batch_size=4, **params)


def meta_transformer_shapes(args: Any) -> dict[str, tuple[int, ...]]:
    """The state dict of Meta's ``Transformer(args)``: names and shapes (FeedForward's hidden-size rule)."""
    n_kv = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
    head_dim = args.dim // args.n_heads
    hidden = int(2 * (4 * args.dim) / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (args.n_heads * head_dim, args.dim),
                       p + "attention.wk.weight": (n_kv * head_dim, args.dim),
                       p + "attention.wv.weight": (n_kv * head_dim, args.dim),
                       p + "attention.wo.weight": (args.dim, args.n_heads * head_dim),
                       p + "feed_forward.w1.weight": (hidden, args.dim),
                       p + "feed_forward.w2.weight": (args.dim, hidden),
                       p + "feed_forward.w3.weight": (hidden, args.dim),
                       p + "attention_norm.weight": (args.dim,), p + "ffn_norm.weight": (args.dim,)})
    shapes.update({"norm.weight": (args.dim,), "output.weight": (args.vocab_size, args.dim)})
    return shapes


@pytest.mark.parametrize(("cfg", "args_cls"), [
    (LLAMA2, MetaArgsLlama2), (LLAMA2.replace(tie_embeddings=True), MetaArgsLlama2),
    (LLAMA3, MetaArgsLlama3), (LLAMA31, MetaArgsLlamaModels)], ids=["llama2", "llama2-tied", "llama3", "llama3.1"])
def test_meta_export_loads_in_metas_build(tmp_path: Path, cfg: LlamaConfig, args_cls: type) -> None:
    model = _model(cfg, seed=2)
    save_checkpoint(model, cfg, tmp_path / "meta", format="meta")
    args = meta_build_args(args_cls, tmp_path / "meta")  # a TypeError here is what users hit before
    assert (args.dim, args.n_layers, args.n_heads, args.vocab_size, args.max_seq_len) == (
        cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, 512)
    assert (args.n_kv_heads or args.n_heads) == cfg.kv_heads
    assert getattr(args, "rope_theta", 10000.0) == cfg.rope_theta  # Llama 2's code hard-codes 10000
    assert getattr(args, "use_scaled_rope", False) == (cfg.rope_scaling is not None)
    checkpoint = torch.load(tmp_path / "meta" / "consolidated.00.pth", map_location="cpu")  # as Meta loads it
    # Meta calls load_state_dict(strict=False): a wrong name would silently keep random weights.
    assert {n: tuple(t.shape) for n, t in checkpoint.items()} == meta_transformer_shapes(args)
    loaded_cfg, state = load_meta(tmp_path / "meta", max_seq_len=cfg.max_seq_len)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_meta_params_refuse_what_metas_code_cannot_express() -> None:
    scaled = LLAMA31.replace(rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position=8192))
    with pytest.raises(ValueError, match="hard-codes"):
        params_from_config(scaled)
    assert "max_seq_len" not in params_from_config(get_config("llama2_70b"))
    assert "rope_theta" not in params_from_config(get_config("llama2_70b"))
    assert params_from_config(get_config("llama3_1_405b"))["use_scaled_rope"] is True


def test_convert_cli_to_meta_and_back(tmp_path: Path) -> None:
    model = _model(LLAMA3, seed=5)
    save_checkpoint(model, LLAMA3, tmp_path / "hf", format="hf")
    env_cmd = [sys.executable, "-m", "model", "convert", "--from", "hf", "--to", "meta",
               "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "meta"), "--dtype", "bfloat16"]
    done = subprocess.run(env_cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(tmp_path / "meta" / "consolidated.00.pth", map_location="cpu")
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.values())
    assert meta_transformer_shapes(meta_build_args(MetaArgsLlama3, tmp_path / "meta")) == {
        n: tuple(t.shape) for n, t in checkpoint.items()}
    _, state = load_meta(tmp_path / "meta")
    assert torch.equal(state["layers.1.attention.wk.weight"],
                       model.state_dict()["layers.1.attention.wk.weight"].bfloat16())
