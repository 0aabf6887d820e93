"""Streaming tensor files: write safetensors and torch ``.pth`` files one tensor at a time, hash while writing.

    from model.checkpoints.streaming import TensorSpec, write_safetensors, write_torch_file, plan_shards
    specs = [TensorSpec("w", (4096, 4096), torch.bfloat16), ...]          # names, shapes, dtypes: no data
    record = write_safetensors(path, specs, fetch=read_one_tensor)         # peak memory: one tensor
    record.bytes, record.sha256                                            # for meta.json / integrity checks

Why not ``safetensors.torch.save_file`` / ``torch.save``: both take the whole state dict at once, so
writing a 405B model (1.6 TB in fp32) would need it all in memory. A safetensors file is an 8-byte header
length, a JSON header giving every tensor's dtype, shape and byte range, then the raw bytes back to back;
all of the header follows from the specs, so the bytes can follow one tensor at a time.

A ``.pth`` file (``torch.save``'s zip format, which Meta's reference code reads) is a zip archive holding
``data.pkl`` (the pickled dict, whose tensors refer to storages by key) and one ``data/KEY`` record per
storage. ``write_torch_file`` pickles placeholders that reduce exactly like real tensors
(``torch._utils._rebuild_tensor_v2`` over a typed storage) and then streams each storage's bytes through
torch's own zip writer; ``torch.load(..., weights_only=True)`` reads the result.

Every writer returns a ``FileRecord`` (size and SHA-256 of the bytes written), computed on the way out,
so recording a checksum costs no second read of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

HASH_CHUNK = 16 * 1024**2
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class TensorSpec:
    """What a file will hold for one tensor, known before any of its bytes are read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class FileRecord:
    """Size and SHA-256 of one written file (what ``meta.json`` records and ``verify_file`` checks)."""

    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


Fetch = Callable[[str], Tensor]


class HashingWriter:
    """A binary file wrapper that counts and hashes everything written through it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.size, self.hash = fh, 0, hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.fh.write(view)
        self.hash.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self.fh.flush()

    def record(self) -> FileRecord:
        return FileRecord(bytes=self.size, sha256=self.hash.hexdigest())


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units like Hugging Face's ``max_shard_size``; ``"5GiB"`` binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy in the given order, like ``save_pretrained``: a tensor larger than the limit gets its own shard."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _raw_bytes(tensor: Tensor) -> memoryview:
    """The tensor's bytes in C order, without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _checked(spec: TensorSpec, tensor: Tensor, path: Path) -> Tensor:
    if tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{path}: tensor {spec.name!r} arrived with shape {list(tensor.shape)}, the file header "
                         f"promised {list(spec.shape)}")
    return tensor.to(spec.dtype)


def write_safetensors(path: str | Path, specs: Sequence[TensorSpec], fetch: Fetch, *,
                      metadata: dict[str, str] | None = None, fsync: bool = True) -> FileRecord:
    """Write ``specs`` to ``path`` in safetensors format, asking ``fetch(name)`` for one tensor at a time.

    Tensors are cast to their spec's dtype; a tensor arriving with another shape is a ValueError. The file
    is written in place (callers publish whole directories atomically) and fsynced unless ``fsync=False``.
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {spec.name!r} has dtype {spec.dtype}, which safetensors cannot hold")
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
    with open(path, "wb") as fh:
        out = HashingWriter(fh)
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for spec in specs:
            tensor = _checked(spec, fetch(spec.name), path)
            out.write(_raw_bytes(tensor))
            del tensor
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    return out.record()


# ---------------------------------------------------------------------------------------------------
# torch.save's zip format, streamed
# ---------------------------------------------------------------------------------------------------
# The legacy storage class names torch.save pickles for each dtype (``TypedStorage._pickle_storage_type``).
_STORAGE_TYPES = {torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
                  torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
                  torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
                  torch.bool: "BoolStorage"}


class _StorageSlot:
    """Stands for one tensor's storage in the pickle (becomes a persistent id, like torch's own)."""

    def __init__(self, key: str, spec: TensorSpec) -> None:
        self.key, self.spec = key, spec


class _TensorPlaceholder:
    """Pickles exactly as ``torch.save`` pickles a contiguous CPU tensor, without holding any data."""

    def __init__(self, slot: _StorageSlot) -> None:
        self.slot = slot

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        shape = self.slot.spec.shape
        stride, step = [], 1
        for n in reversed(shape):
            stride.append(step)
            step *= n
        return (torch._utils._rebuild_tensor_v2,
                (self.slot, 0, torch.Size(shape), tuple(reversed(stride)), False, OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageSlot):
            numel = obj.spec.nbytes // torch.empty((), dtype=obj.spec.dtype).element_size()
            if obj.spec.dtype not in _STORAGE_TYPES:
                raise ValueError(f"tensor {obj.spec.name!r}: dtype {obj.spec.dtype} cannot go into a .pth file here")
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.spec.dtype]), obj.key, "cpu", numel)
        return None


def write_torch_file(path: str | Path, specs: Sequence[TensorSpec], fetch: Fetch, *,
                     fsync: bool = True) -> FileRecord:
    """Write ``{name: tensor}`` in ``torch.save``'s format, one tensor in memory at a time.

    ``torch.load(path, weights_only=True)`` (and Meta's ``Llama.build``) read it back as a plain dict.
    """
    path = Path(path)
    slots = [_StorageSlot(str(i), spec) for i, spec in enumerate(specs)]
    buffer = _pickle_bytes({slot.spec.name: _TensorPlaceholder(slot) for slot in slots})
    from torch.serialization import _get_storage_alignment, get_crc32_options

    with open(path, "wb") as fh:
        out = HashingWriter(fh)
        writer = torch._C.PyTorchFileWriter(out, get_crc32_options(), _get_storage_alignment())
        writer.write_record("data.pkl", buffer, len(buffer))
        writer.write_record(".format_version", "1", 1)
        alignment = str(_get_storage_alignment())
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for slot in slots:
            tensor = _checked(slot.spec, fetch(slot.spec.name), path).contiguous()
            writer.write_record(f"data/{slot.key}", tensor.untyped_storage(), slot.spec.nbytes)
            del tensor
        writer.write_end_of_file()
        del writer
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    return out.record()


def _pickle_bytes(obj: Any) -> bytes:
    import io

    data = io.BytesIO()
    _Pickler(data, protocol=2).dump(obj)
    return data.getvalue()


# ---------------------------------------------------------------------------------------------------
# Reading safetensors with plain reads
# ---------------------------------------------------------------------------------------------------
ROW_BLOCK_BYTES = 16 * 1024**2


class SafetensorsFile:
    """One safetensors file read with ``pread`` into fresh tensors: whole tensors, flat ranges, row/column slices.

    ``safe_open`` memory-maps the file, and every page it touches then counts in the process's resident
    memory until the handle closes; reading with ``os.pread`` into the output tensor keeps resident memory
    at exactly what was asked for, which is what a rank reading only its slice must show. No file
    descriptor stays open between calls (16k ranks' files must not exhaust descriptors).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > 100 * 1024**2:
                    raise ValueError(f"header length {length} is implausible")
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error) as err:
            raise ValueError(f"{self.path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + length
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = TORCH_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            self._entries[name] = (dtype, tuple(info["shape"]), int(begin), int(end))

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def _entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._entries[name]

    def read(self, name: str) -> Tensor:
        shape = self.shape(name)
        return self.read_flat(name, 0, _prod(shape)).view(shape)

    def read_flat(self, name: str, lo: int, hi: int, *, into: Tensor | None = None) -> Tensor:
        """Elements ``[lo, hi)`` of the tensor flattened in C order (into ``into`` if given, 1-D)."""
        dtype, shape, begin, end = self._entry(name)
        size = torch.empty((), dtype=dtype).element_size()
        if not 0 <= lo <= hi <= _prod(shape):
            raise IndexError(f"{self.path}: elements {lo}:{hi} of {name!r} (shape {list(shape)})")
        out = torch.empty(hi - lo, dtype=dtype) if into is None else into
        view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        offset, want = self._data_start + begin + lo * size, (hi - lo) * size
        if begin + hi * size > end:
            raise ValueError(f"{self.path}: tensor {name!r} is shorter than its shape says")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < want:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise ValueError(f"{self.path}: file ends inside tensor {name!r} (truncated?)")
                done += n
        finally:
            os.close(fd)
        return out

    def read_slice(self, name: str, *, dim: int, start: int, stop: int) -> Tensor:
        """``tensor.narrow(dim, start, stop - start)``: one flat range per block of leading indices."""
        dtype, shape, _, _ = self._entry(name)
        outer, inner = _prod(shape[:dim]), _prod(shape[dim + 1:])
        out_shape = list(shape)
        out_shape[dim] = stop - start
        out = torch.empty(out_shape, dtype=dtype)
        if outer == 1:
            self.read_flat(name, start * inner, stop * inner, into=out.view(-1))
            return out
        row = shape[dim] * inner
        block = max(1, ROW_BLOCK_BYTES // max(1, row * out.element_size()))
        target = out.view(outer, stop - start, inner)
        for first in range(0, outer, block):
            last = min(outer, first + block)
            rows = self.read_flat(name, first * row, last * row).view(last - first, shape[dim], inner)
            target[first:last].copy_(rows[:, start:stop, :])
        return out


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------
def hash_file(path: str | Path) -> FileRecord:
    """Size and SHA-256 of an existing file, read in 16 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(bytes=size, sha256=digest.hexdigest())


def verify_file(path: str | Path, expected: dict[str, Any], *, checksum: bool = True) -> str | None:
    """None if ``path`` has the recorded size (and checksum); else what is wrong, naming the file."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: missing (recorded {expected.get('bytes')} bytes)"
    size = path.stat().st_size
    if size != int(expected["bytes"]):
        return f"{path}: {size} bytes on disk, {expected['bytes']} recorded (truncated or overwritten)"
    if checksum and "sha256" in expected:
        actual = hash_file(path).sha256
        if actual != expected["sha256"]:
            return f"{path}: SHA-256 {actual[:16]}... differs from the recorded {str(expected['sha256'])[:16]}..."
    return None


def spec_of(name: str, tensor: Tensor, dtype: torch.dtype | None = None) -> TensorSpec:
    return TensorSpec(name, tuple(tensor.shape), dtype or tensor.dtype)


def specs_of(tensors: Iterable[tuple[str, Tensor]], dtype: torch.dtype | None = None) -> list[TensorSpec]:
    return [spec_of(name, t, dtype) for name, t in tensors]


# ---------------------------------------------------------------------------------------------------
# Sharded safetensors (Hugging Face's layout, also used by native checkpoints)
# ---------------------------------------------------------------------------------------------------
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def write_sharded_safetensors(out_dir: Path, specs: Sequence[TensorSpec], fetch: Fetch, *,
                              max_shard_bytes: int) -> dict[str, FileRecord]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (``{"metadata": {"total_size"}, "weight_map": {name: file}}``, as ``save_pretrained`` writes them)."""
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        return {SAFE_WEIGHTS: write_safetensors(out_dir / SAFE_WEIGHTS, shards[0], fetch)}
    records: dict[str, FileRecord] = {}
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        records[file_name] = write_safetensors(out_dir / file_name, shard, fetch)
        weight_map.update(dict.fromkeys((s.name for s in shard), file_name))
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return records
