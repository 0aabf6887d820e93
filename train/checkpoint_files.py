"""What a training checkpoint records about its own files, and how it is checked: manifests, verification, RNG.

    from train.checkpoint_files import write_manifest, verify_checkpoint, rng_state_json, set_rng_state_json
    write_manifest(tmp, rank=r, files={"portable/tp00-pp00-dp000.safetensors": record})   # per rank
    problems = verify_checkpoint(step_dir, share=(rank, world))       # this rank's share of the checksums

Integrity chain: every rank lists the files it wrote, with size and SHA-256 (computed while writing), in
``manifests/rank_NNNNN.json``; rank 0 merges them into ``meta.json["files"]`` and writes the ``COMPLETE`` marker
holding the SHA-256 of ``meta.json`` itself. ``verify_checkpoint`` checks the marker against meta.json, every
file's size (a stat: this catches truncation), and the checksums of its share of the files (file ``i`` is
hashed by rank ``i % world``, so a resume reads the checkpoint once, spread over all ranks).

RNG states are JSON (Python's Mersenne state as ints, numpy's as a list, torch's byte tensors in base64):
nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoints.streaming import FileRecord, hash_file, verify_file

MANIFESTS = "manifests"
META = "meta.json"
COMPLETE = "COMPLETE"
RNG_DIR = "rng"


def manifest_path(checkpoint_dir: Path, rank: int) -> Path:
    return Path(checkpoint_dir) / MANIFESTS / f"rank_{rank:05d}.json"


def read_json_file(path: Path) -> Any:
    """A checkpoint's JSON file; anything else (a pickle, a truncated write) is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({type(err).__name__}: {err}); the checkpoint is "
                         "damaged or was not written by this program") from err


def write_json_atomic(path: Path, data: Any) -> None:
    """Write via a temporary name + fsync + rename, so readers see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(data, indent=1, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(checkpoint_dir: Path, *, rank: int, files: dict[str, FileRecord] | None = None,
                   error: str | None = None) -> None:
    """This rank is done: the files it wrote (relative paths), or the error that stopped it."""
    records = {name: r.to_dict() for name, r in (files or {}).items()}
    write_json_atomic(manifest_path(checkpoint_dir, rank), {"rank": rank, "files": records, "error": error})


def read_manifest(checkpoint_dir: Path, rank: int) -> dict[str, Any] | None:
    path = manifest_path(checkpoint_dir, rank)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def unclaimed_files(checkpoint_dir: Path, claimed: set[str]) -> dict[str, FileRecord]:
    """Hash files no manifest lists (an engine whose ``save`` does not report what it wrote)."""
    out: dict[str, FileRecord] = {}
    root = Path(checkpoint_dir)
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = str((Path(dirpath) / name).relative_to(root))
            if rel not in claimed and not rel.startswith(MANIFESTS + "/") and rel not in (META, COMPLETE):
                out[rel] = hash_file(Path(dirpath) / name)
    return dict(sorted(out.items()))


def seal(checkpoint_dir: Path, meta: dict[str, Any]) -> None:
    """Write meta.json, then ``COMPLETE`` holding meta.json's SHA-256 (both fsynced)."""
    write_json_atomic(checkpoint_dir / META, meta)
    digest = hashlib.sha256((checkpoint_dir / META).read_bytes()).hexdigest()
    with open(checkpoint_dir / COMPLETE, "w") as fh:
        fh.write(f"sha256 {digest}\n")
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(checkpoint_dir: Path, *, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems found (empty: intact). Sizes of all files; checksums of file ``i`` where ``i % world == rank``.

    Checkpoints written before integrity records existed (no ``files`` in meta.json) pass with a note.
    """
    checkpoint_dir = Path(checkpoint_dir)
    problems: list[str] = []
    marker = (checkpoint_dir / COMPLETE).read_text().split() if (checkpoint_dir / COMPLETE).is_file() else []
    try:
        meta_bytes = (checkpoint_dir / META).read_bytes()
        meta = json.loads(meta_bytes)
    except (OSError, json.JSONDecodeError) as err:
        return [f"{checkpoint_dir / META}: unreadable ({type(err).__name__}: {err})"]
    if len(marker) == 2 and marker[0] == "sha256" and hashlib.sha256(meta_bytes).hexdigest() != marker[1]:
        problems.append(f"{checkpoint_dir / META}: SHA-256 differs from the one recorded in {COMPLETE}")
    files = meta.get("files")
    if not isinstance(files, dict):
        return problems  # an older checkpoint without integrity records: nothing more to check
    rank, world = share
    for i, (name, record) in enumerate(sorted(files.items())):
        problem = verify_file(checkpoint_dir / name, record, checksum=i % world == rank)
        if problem:
            problems.append(problem)
    return problems


# ---------------------------------------------------------------------------------------------------
# RNG state as JSON
# ---------------------------------------------------------------------------------------------------
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state_json() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states in plain JSON types."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state_json(state: dict[str, Any], *, source: str | Path = "rng state") -> None:
    """Restore what ``rng_state_json`` captured; a malformed file is a ValueError naming it."""
    try:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]))
        nps = state["numpy"]
        np.random.set_state((str(nps["kind"]), np.array(nps["keys"], dtype=np.uint32), int(nps["pos"]),
                             int(nps["has_gauss"]), float(nps["cached_gaussian"])))
        torch.set_rng_state(_unb64(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: not a valid RNG state ({type(err).__name__}: {err})") from err
