"""The Llama papers' zero-shot benchmarks as lm-eval tasks over local files, and the checks run before any model.

    from evaluation.tasks import task_manager, check_tasks, SHARED_TASKS
    manager = task_manager(data_dir="../shared/data")          # renders the YAMLs, indexes them
    check_tasks(["hellaswag", "piqa"], manager=manager)        # unknown name / missing file -> TaskError

The YAMLs beside this module follow lm-eval's built-in definitions of the same tasks (prompts, choices, metrics;
lm-eval's own ``process_docs`` / ``doc_to_*`` functions where it has them) and carry the task names lm-eval uses,
so results read the same. Only the data source differs: ``dataset_path: json`` / ``arrow`` with ``data_files``
under ``${LLAMA_DATA_DIR}``, a placeholder that ``render_tasks`` replaces with the data directory at run time (the
data is never part of the repository). Everything runs offline (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``).
A user's own task folder (``--include-path``) is indexed after ours and may override our names.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from train.config_reader import ConfigError

TASK_TEMPLATE_DIR = Path(__file__).resolve().parent
PLACEHOLDER = "${LLAMA_DATA_DIR}"
# The multiple-choice / cloze benchmarks every model gets a table of (the LLaMA paper's set that has public data).
SHARED_TASKS: tuple[str, ...] = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "winogrande", "boolq")
PERPLEXITY_TASKS: tuple[str, ...] = ("wikitext",)
_DATA_PATH = re.compile(re.escape(PLACEHOLDER) + r"/([^\s'\"]+)")


class TaskError(ConfigError):
    """A requested task cannot run: unknown name or missing data file (raised before any model is loaded).

    A ``ConfigError`` (a ``ValueError``): in a training run's ``[eval]``, ``python -m train`` prints it as one line."""


def default_data_dir() -> Path:
    """``$LLAMA_DATA_DIR``, else ``../shared/data`` beside the repository (the project's convention)."""
    env = os.environ.get("LLAMA_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def set_offline() -> None:
    """Nothing downloads: lm-eval and ``datasets`` read only local files (and fail clearly otherwise)."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def templates() -> dict[str, Path]:
    """Our task name -> its YAML template."""
    out = {}
    for path in sorted(TASK_TEMPLATE_DIR.glob("*.yaml")):
        match = re.search(r"^task:\s*(\S+)\s*$", path.read_text(encoding="utf-8"), flags=re.M)
        if match is None:
            raise TaskError(f"{path}: task template without a `task:` line")
        out[match.group(1)] = path
    return out


def data_files(task: str, data_dir: str | Path) -> list[Path]:
    """The local files one of our tasks reads, resolved under ``data_dir``."""
    text = templates()[task].read_text(encoding="utf-8")
    return [Path(data_dir) / rel for rel in _DATA_PATH.findall(text)]


def render_tasks(data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write our YAMLs with ``${LLAMA_DATA_DIR}`` replaced by ``data_dir`` into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = str(Path(data_dir).resolve())
    for path in templates().values():
        (out / path.name).write_text(path.read_text(encoding="utf-8").replace(PLACEHOLDER, root), encoding="utf-8")
    return out


def task_manager(*, data_dir: str | Path | None = None, include_path: Sequence[str | Path] = (),
                 include_defaults: bool = False, rendered_dir: str | Path | None = None) -> Any:
    """An lm-eval ``TaskManager`` over our rendered tasks, then ``include_path`` folders.

    ``include_defaults``: also index lm-eval's ~14,000 built-in tasks (~13 s; they read from the Hugging Face hub
    or its local cache, so offline they only work when that cache holds their data).
    """
    from lm_eval.tasks import TaskManager

    set_offline()
    for folder in include_path:
        if not Path(folder).is_dir():
            raise TaskError(f"--include-path {folder}: no such directory (a folder of lm-eval task YAMLs)")
    rendered = Path(rendered_dir) if rendered_dir else Path(tempfile.mkdtemp(prefix="llama-eval-tasks-"))
    render_tasks(data_dir or default_data_dir(), rendered)
    manager = TaskManager(include_path=[str(rendered), *map(str, include_path)], include_defaults=include_defaults)
    manager.llama_data_dir = Path(data_dir or default_data_dir())
    manager.llama_rendered_dir = rendered.resolve()
    return manager


def parse_task_list(spec: str | Iterable[str]) -> list[str]:
    """``"a,b, c"`` or a list -> ``["a", "b", "c"]``; an empty list is an error."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise TaskError("no task given: pass --tasks NAME[,NAME...] (ours: " + ", ".join(sorted(templates())) + ")")
    return names


def check_tasks(names: Sequence[str], *, manager: Any) -> None:
    """Every name is known to ``manager`` and every data file of ours it needs exists; else one TaskError."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        ours = ", ".join(sorted(templates()))
        raise TaskError(f"unknown task(s) {', '.join(map(repr, unknown))}: known here are {ours}"
                        + (" plus the --include-path tasks" if len(manager.include_path) > 1 else "")
                        + "; add a folder of task YAMLs with --include-path, or lm-eval's built-in tasks with "
                          "--lm-eval-tasks (those need the Hugging Face dataset cache offline)")
    ours = templates()
    data_dir = manager.llama_data_dir
    for name in names:
        entry = manager.task_index.get(name)
        ours_here = entry is not None and entry.yaml_path is not None and \
            Path(entry.yaml_path).resolve().parent == manager.llama_rendered_dir
        if name not in ours or not ours_here:
            continue  # a user's or lm-eval's own task: its data is its own business
        missing = [p for p in data_files(name, data_dir) if not p.exists()]
        if missing:
            raise TaskError(f"task {name!r} needs {missing[0]} (not found); set LLAMA_DATA_DIR or --data-dir to the "
                            f"directory that holds eval/ and wikipedia/ (now {data_dir})")
