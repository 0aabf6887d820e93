"""Every ``torch.distributed`` collective of the source tree is called in ``model/comm.py`` and nowhere else.

    pytest tests/unit/test_collectives_in_one_place.py

Read from the source with ``ast``: ``dist.all_reduce(...)`` for any name bound to ``torch.distributed`` (``import
torch.distributed as dist``, ``from torch import distributed``), ``torch.distributed.barrier(...)`` spelled out,
and collectives imported by name (``from torch.distributed import all_reduce``). Scanned: model/, data_pipeline/,
train/, rlhf/, launch/, benchmarks/, evaluation/. Exempt: ``model/comm.py`` itself, and tests/ (test launchers may talk to
their own process groups directly). Process-group setup (``init_process_group``, ``new_group``, ``get_rank``...)
is not a collective and stays where it is (``train/topology.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

SCANNED = ("model", "data_pipeline", "train", "rlhf", "launch", "benchmarks", "evaluation")
THE_MODULE = REPO_ROOT / "model" / "comm.py"
COLLECTIVE_PREFIXES = ("all_reduce", "all_gather", "_all_gather", "all_to_all", "broadcast", "barrier",
                       "monitored_barrier", "gather", "scatter", "reduce", "_reduce_scatter", "send", "recv",
                       "isend", "irecv", "batch_isend_irecv", "P2POp")


def is_collective(name: str) -> bool:
    return name.startswith(COLLECTIVE_PREFIXES)


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name/Attribute chain ("" for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def collective_calls(source: str) -> list[tuple[int, str]]:
    """``(line, call)`` of every torch.distributed collective called in ``source``."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}  # names that mean the torch.distributed module
    direct: set[str] = set()  # collectives imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    aliases.add(a.asname or a.name)
                elif node.module.startswith("torch.distributed") and is_collective(a.name):
                    direct.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        owner, _, attr = name.rpartition(".")
        if (owner in aliases and is_collective(attr)) or (not owner and name in direct):
            found.append((node.lineno, name))
    return found


def test_the_scanner_finds_every_spelling() -> None:
    source = """
import torch.distributed as dist
import torch
from torch import distributed as d2
from torch.distributed import all_gather_object as ago, get_rank
dist.all_reduce(t)
torch.distributed.barrier()
d2.broadcast_object_list(box, src=0)
ago(out, obj)
dist.get_rank(); get_rank(); dist.ReduceOp.MAX; comm.all_reduce(t)
"""
    assert [name for _, name in collective_calls(source)] == ["dist.all_reduce", "torch.distributed.barrier",
                                                                "d2.broadcast_object_list", "ago"]


def test_no_collective_outside_model_comm() -> None:
    offenders = []
    for package in SCANNED:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path == THE_MODULE:
                continue
            offenders += [f"{path.relative_to(REPO_ROOT)}:{line}: {call}"
                          for line, call in collective_calls(path.read_text())]
    assert offenders == [], ("torch.distributed collectives outside model/comm.py (call the model.comm helper, which "
                             "puts the tensor on a device the group's backend accepts):\n" + "\n".join(offenders))


def test_model_comm_does_call_collectives() -> None:
    """The scan is not vacuous: it sees the collectives of the one module allowed to call them."""
    assert len(collective_calls(Path(THE_MODULE).read_text())) >= 6
