"""Megatron ``.bin/.idx`` helpers: lazy megatron import, dtype choice, and an integrity check at open.

    from data_pipeline.shard_io import validate_indexed, token_dtype
    validate_indexed("out/c4", expect_docs=883)    # ShardError naming the file on any mismatch

megatron-core's ``IndexedDataset`` memory-maps the files and trusts them: a truncated ``.bin`` is only
noticed (as an opaque numpy error, or silently wrong tokens) when a sample beyond the end is read, possibly
hours into training. ``validate_indexed`` reads the 34-byte ``.idx`` header and arrays and checks every size
against the files before anything is built on them. Importing megatron-core costs ~5 s and prints four
"Transformer Engine and Apex are not installed" warnings; ``mcore_datasets`` imports it once, quietly.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}


class ShardError(ValueError):
    """A ``.bin/.idx`` pair that cannot be used; the message names the file and the fix."""


def mcore_datasets() -> SimpleNamespace:
    """megatron.core.datasets classes, imported on first use with the TE/Apex warnings silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
        from megatron.core.datasets.blended_dataset import BlendedDataset
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
    return SimpleNamespace(BlendedDataset=BlendedDataset, BlendedMegatronDatasetBuilder=BlendedMegatronDatasetBuilder,
                           GPTDataset=GPTDataset, GPTDatasetConfig=GPTDatasetConfig, DType=DType,
                           IndexedDataset=IndexedDataset, IndexedDatasetBuilder=IndexedDatasetBuilder)


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype megatron-core accepts for this vocabulary (uint16 below 65500, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def read_index(prefix: str | Path) -> dict:
    """Parse ``PREFIX.idx`` (header + arrays) without megatron; ShardError on anything malformed."""
    idx = Path(f"{prefix}.idx")
    fix = "re-run `python -m data_pipeline prepare` into a fresh output directory for this source"
    if not idx.is_file():
        raise ShardError(f"{idx}: index file missing; {fix}")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER:
        raise ShardError(f"{idx}: not a megatron IndexedDataset index (bad or short header, {size} bytes); {fix}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in _DTYPES:
        raise ShardError(f"{idx}: unsupported index version {version} or dtype code {code}; {fix}")
    want = 34 + n_seq * (4 + 8) + n_doc * 8
    if size < want:
        raise ShardError(f"{idx}: truncated: {size} bytes, header promises {n_seq} sequences and "
                         f"{n_doc - 1} documents ({want} bytes); {fix}")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=34 + 4 * n_seq)
    docs = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=34 + 12 * n_seq)
    return {"path": idx, "dtype": _DTYPES[code], "lengths": lengths, "pointers": pointers, "doc_indices": docs}


def validate_indexed(prefix: str | Path, *, expect_docs: int | None = None, expect_tokens: int | None = None,
                     expect_dtype: type[np.number] | None = None) -> dict:
    """Check ``PREFIX.bin`` against ``PREFIX.idx`` (and the manifest's counts); returns basic stats."""
    ix = read_index(prefix)
    idx, binf = ix["path"], Path(f"{prefix}.bin")
    fix = "the pair is from an interrupted copy or another run: re-run prepare or restore both files together"
    lengths, docs = ix["lengths"], ix["doc_indices"]
    itemsize = np.dtype(ix["dtype"]).itemsize
    n_tokens = int(lengths.sum(dtype=np.int64))
    if not binf.is_file():
        raise ShardError(f"{binf}: data file missing next to {idx}; {fix}")
    if binf.stat().st_size != n_tokens * itemsize:
        raise ShardError(f"{binf}: {binf.stat().st_size} bytes, but {idx} indexes {n_tokens} tokens of "
                         f"{itemsize} bytes ({n_tokens * itemsize} bytes): truncated or mismatched; {fix}")
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths) or np.any(np.diff(docs) < 0):
        raise ShardError(f"{idx}: document index is not a monotone 0..{len(lengths)} range; {fix}")
    if len(lengths) and (ix["pointers"][0] != 0 or
                         np.any(np.diff(ix["pointers"]) != lengths[:-1].astype(np.int64) * itemsize)):
        raise ShardError(f"{idx}: sequence pointers disagree with sequence lengths; {fix}")
    n_docs = len(docs) - 1
    if expect_dtype is not None and np.dtype(ix["dtype"]) != np.dtype(expect_dtype):
        raise ShardError(f"{idx}: token dtype {np.dtype(ix['dtype'])}, manifest says {np.dtype(expect_dtype)}; {fix}")
    if expect_docs is not None and n_docs != expect_docs:
        raise ShardError(f"{idx}: {n_docs} documents, manifest.json says {expect_docs}; {fix}")
    if expect_tokens is not None and n_tokens != expect_tokens:
        raise ShardError(f"{idx}: {n_tokens} tokens, manifest.json says {expect_tokens}; {fix}")
    return {"documents": n_docs, "tokens": n_tokens, "dtype": str(np.dtype(ix["dtype"]))}


def merge_indexed(prefixes: list[str | Path], out_prefix: str | Path) -> dict:
    """Concatenate ``.bin/.idx`` pairs (in order) into ``out_prefix``, streaming: memory is one input index at a
    time, never a per-document Python list (megatron's ``add_index`` keeps every length in a list). The index
    is byte-identical to what megatron's ``IndexedDatasetBuilder`` writes for the same documents. Files are
    written under ``.tmp`` names and renamed (``.idx`` last); returns ``{"documents", "tokens", "dtype"}``."""
    import os
    import shutil

    out = Path(out_prefix)
    heads = [read_index(p) for p in prefixes]
    dtypes = {np.dtype(h["dtype"]) for h in heads}
    if len(dtypes) > 1:
        raise ShardError(f"{out}: cannot merge shards of different token dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop() if dtypes else np.dtype(np.uint16)
    code = next(k for k, v in _DTYPES.items() if np.dtype(v) == dtype)
    n_seq = sum(len(h["lengths"]) for h in heads)
    n_doc = sum(len(h["doc_indices"]) - 1 for h in heads)
    tmp_bin, tmp_idx = Path(f"{out}.tmp.bin"), Path(f"{out}.tmp.idx")
    with open(tmp_bin, "wb") as fb:
        for p in prefixes:
            with open(f"{p}.bin", "rb") as f:
                shutil.copyfileobj(f, fb, 8 << 20)
    with open(tmp_idx, "wb") as fi:
        fi.write(_INDEX_HEADER + struct.pack("<QBQQ", 1, code, n_seq, n_doc + 1))
        for h in heads:
            fi.write(np.asarray(h["lengths"], dtype=np.int32).tobytes())
        byte_offset = 0
        for h in heads:
            fi.write((np.asarray(h["pointers"], dtype=np.int64) + byte_offset).tobytes())
            byte_offset += int(h["lengths"].sum(dtype=np.int64)) * dtype.itemsize
        fi.write(np.zeros(1, dtype=np.int64).tobytes())
        seq_offset = 0
        for h in heads:
            fi.write((np.asarray(h["doc_indices"][1:], dtype=np.int64) + seq_offset).tobytes())
            seq_offset += len(h["lengths"])
    del heads
    os.replace(tmp_bin, f"{out}.bin")
    os.replace(tmp_idx, f"{out}.idx")
    return validate_indexed(out, expect_docs=n_doc)
