"""Every task and every objective follows its typed Protocol (``train.task.Task``, ``train.objective.Objective``):
the same members, and methods whose parameters the loop and the engine can pass by the Protocol's names.

    pytest tests/unit/test_protocols.py

The implementers are found in the source (``ast``: a class defining ``wrap`` and ``native_name`` is an objective,
one defining ``build_datasets``, ``loader`` and ``export`` is a task, also through a base class), so a new stage
is checked without being listed here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from train.objective import Objective
from train.task import Task

pytestmark = pytest.mark.timeout(120)

OBJECTIVE_METHODS = {"wrap", "native_name"}
TASK_METHODS = {"build_datasets", "loader", "export"}


def _classes_defining(names: set[str], *, also_subclasses: bool) -> list[type]:
    found: dict[str, type] = {}
    for path in sorted(p for pkg in ("train", "rlhf") for p in (REPO_ROOT / pkg).rglob("*.py")):
        module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                defined = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
                if (names <= defined or also_subclasses) and not any(
                        isinstance(b, ast.Name) and b.id == "Protocol" for b in node.bases):
                    cls = getattr(importlib.import_module(module), node.name)
                    if all(callable(getattr(cls, n, None)) for n in names):
                        found[f"{module}.{node.name}"] = cls
    return list(found.values())


def _protocol_members(protocol: type) -> tuple[set[str], dict[str, inspect.Signature]]:
    attributes = set(getattr(protocol, "__annotations__", {}))
    methods = {name: inspect.signature(fn) for name, fn in vars(protocol).items()
               if inspect.isfunction(fn) and not name.startswith("_")}
    return attributes, methods


def _mismatches(cls: type, protocol: type) -> list[str]:
    """What ``cls`` lacks of ``protocol``, or where a method cannot take the Protocol's arguments."""
    attributes, methods = _protocol_members(protocol)
    out = [f"{cls.__name__} lacks {a}" for a in sorted(attributes) if not hasattr(cls, a)]
    for name, wanted in methods.items():
        impl = getattr(cls, name, None)
        if impl is None:
            out.append(f"{cls.__name__} lacks {name}()")
            continue
        have = inspect.signature(impl).parameters
        if any(p.kind is p.VAR_KEYWORD for p in have.values()):
            continue  # **kwargs takes whatever the Protocol passes
        for param in list(wanted.parameters.values())[1:]:  # self
            got = have.get(param.name)
            if got is None or (param.kind is param.KEYWORD_ONLY and got.kind is got.POSITIONAL_ONLY):
                out.append(f"{cls.__name__}.{name} does not take {param.name!r} ({param.kind.description})")
        required = [p.name for p in list(have.values())[1:] if p.default is p.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in wanted.parameters]
        if required:
            out.append(f"{cls.__name__}.{name} requires {required}, which the Protocol does not pass")
    return out


def _objectives() -> list[type]:
    return _classes_defining(OBJECTIVE_METHODS, also_subclasses=False)


def _tasks() -> list[type]:
    return [c for c in _classes_defining(TASK_METHODS, also_subclasses=True)
            if all(hasattr(c, n) for n in TASK_METHODS)]


def test_every_objective_follows_the_protocol() -> None:
    objectives = _objectives()
    names = {c.__name__ for c in objectives}
    assert {"LanguageModelObjective", "RewardObjective", "PolicyObjective", "ValueObjective"} <= names
    assert [m for c in objectives for m in _mismatches(c, Objective)] == []


def test_every_task_follows_the_protocol() -> None:
    tasks = _tasks()
    names = {c.__name__ for c in tasks}
    assert {"PretrainTask", "SFTTask", "RewardTask", "GAttTask"} <= names
    assert [m for c in tasks for m in _mismatches(c, Task)] == []


def test_the_check_finds_a_mismatch() -> None:
    class OldObjective:  # the pre-issue-13 shape: builds the model itself
        input_keys: Any = ()
        weight_key = "loss_mask"
        supports_pipeline = False
        supports_sequence_parallel = False  # the attributes added since: only wrap() is what this shape lacks
        sequence_keys: Any = ()

        def build_module(self, model_cfg: Any, factory: Any, run_cfg: Any) -> Any: ...

        def native_name(self, name: str) -> str:
            return name

    class WrongWrap(OldObjective):
        def wrap(self, model: Any, factory: Any, run_cfg: Any) -> Any: ...

    assert _mismatches(OldObjective, Objective) == ["OldObjective lacks wrap()"]
    assert _mismatches(WrongWrap, Objective) == ["WrongWrap.wrap does not take 'layers' (keyword-only)",
                                                 "WrongWrap.wrap requires ['factory', 'run_cfg'], which the "
                                                 "Protocol does not pass"]
