"""The shape of the code base: the import graph has no circle and runs one way, and rlhf/ stays readable.

    pytest tests/unit/test_import_graph.py

The graph is read from the source (``ast``), every import counted, also those inside functions: a lazy import
still ties two modules together. Directions (docs/ARCHITECTURE.md): ``model/`` and ``data_pipeline/`` are the
bottom and import neither ``train/`` nor ``rlhf/``; ``train/`` imports neither ``rlhf/`` nor ``launch/``;
``rlhf/`` does not import ``launch/``; one alignment stage never reaches into another stage's private names;
DeepSpeed is imported by ``train/deepspeed_api.py`` only; model/, train/ and rlhf/ keep files and functions short;
one global-batch loader (``data_pipeline/global_batch.py``) serves every stage.
``evaluation/`` sits on top of ``model/`` and ``train/`` (and reads ``data_pipeline/`` shards): nothing below imports
it, and it imports neither ``rlhf/`` (a win rate takes reward scores through its own small interface) nor
``launch/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

PACKAGES = ("model", "data_pipeline", "train", "rlhf", "launch", "evaluation")
FORBIDDEN = {  # importer -> packages it must not import
    "model": ("train", "rlhf", "launch", "evaluation"),
    "data_pipeline": ("train", "rlhf", "launch", "evaluation"),
    "train": ("rlhf", "launch", "evaluation"),
    "rlhf": ("launch", "evaluation"),
    "evaluation": ("rlhf", "launch"),
}
PENDING: set[str] = set()
"""Known arrows against the direction, each with its fix under way. The test fails when one is fixed, so that it
is removed from here and stays fixed."""
PENDING_CYCLES: list[list[str]] = []
"""Known circles, each with its fix under way. The test fails when one is fixed, so that it is removed from here."""
STAGES = ("rlhf.sft", "rlhf.reward", "rlhf.ppo", "rlhf.gatt")
SHORT = ("model", "train", "rlhf")  # packages whose files and functions must stay short
MAX_FILE_LINES = 520  # "~500": the longest rlhf/ file (rlhf/data.py, the readers) is 505
MAX_FUNCTION_LINES = 60
LONG_OK = "# long:"  # a function may exceed MAX_FUNCTION_LINES when its def line says why after this marker


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO_ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that ``name`` (a module or a name inside one) lives in, or None for third-party."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str]]:
    """``(imported module, imported name or "")`` of every import statement in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full, "") if full in MODULES else (base, alias.name))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _ in _imports(module):
            owner = _owner(target)
            if owner and owner != module:
                graph[module].add(owner)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    cycles = _cycles(_graph())
    assert [c for c in cycles if c not in PENDING_CYCLES] == [], "import circle(s): move the shared piece down a level"
    assert all(c in cycles for c in PENDING_CYCLES), "a pending circle is gone: remove it from PENDING_CYCLES"


def test_imports_run_one_way() -> None:
    bad = [f"{module} imports {target}" for module, targets in _graph().items() for target in sorted(targets)
           if target.split(".")[0] in FORBIDDEN.get(module.split(".")[0], ())]
    assert [b for b in bad if b not in PENDING] == [], "imports against the direction of docs/ARCHITECTURE.md"
    assert PENDING <= set(bad), f"fixed: remove {sorted(PENDING - set(bad))} from PENDING"


def test_deepspeed_is_imported_in_one_module() -> None:
    """DeepSpeed's import needs settings first (``train/deepspeed_api.py``); every other module goes through it."""
    importers = sorted(module for module in MODULES
                       if any(target.split(".")[0] == "deepspeed" for target, _ in _imports(module)))
    assert importers == ["train.deepspeed_api"]


def test_no_stage_uses_another_stages_private_names() -> None:
    bad = []
    for module in MODULES:
        mine = next((s for s in STAGES if module == s or module.startswith(s + ".")), None)
        for target, name in _imports(module):
            theirs = next((s for s in STAGES if target == s or target.startswith(s + ".")), None)
            if theirs and theirs != mine and name.startswith("_"):
                bad.append(f"{module} imports {target}.{name}")
    assert bad == [], "move what two stages share to the top of rlhf/ under a public name"


def test_files_and_functions_stay_short() -> None:
    """model/, train/ and rlhf/ (issue 13's acceptance)."""
    long_files, long_functions = [], []
    for module, path in MODULES.items():
        if module.split(".")[0] not in SHORT:
            continue
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(REPO_ROOT)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_OK not in lines[node.lineno - 1]:
                    long_functions.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert long_files == [], f"split these files by responsibility (limit ~{MAX_FILE_LINES} lines)"
    assert long_functions == [], f"split these functions (limit {MAX_FUNCTION_LINES} lines, or say why: {LONG_OK})"


def test_one_global_batch_loader() -> None:
    """Issue 13: one implementation of "DP-independent global batch order with exact resume" for every stage.
    A class that hands out batches (``__iter__``) and keeps ``self.consumed_samples`` is such a loader."""
    loaders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            keeps_count = any(isinstance(t, ast.Attribute) and t.attr == "consumed_samples"
                              for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AugAssign))
                              for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))
            if "__iter__" in methods and keeps_count:
                loaders.append(f"{module}.{node.name}")
    assert loaders == ["data_pipeline.global_batch.GlobalBatchLoader"], \
        "use data_pipeline.global_batch.GlobalBatchLoader with your collate function"
