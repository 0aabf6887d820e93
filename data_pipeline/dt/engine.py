"""The datatrove engine's stages and executors: one machine, SLURM job arrays, or Ray; resumable.

    from data_pipeline.dt.engine import DatatroveConfig, prepare_datatrove
    manifest = prepare_datatrove(prepare_cfg, DatatroveConfig(executor="local", tasks=2, workers=2))

The stages (``OUT/dt/logs/NN_<stage>`` hold datatrove's logs, stats and ``completions/``):

  pass1            T tasks  our readers -> normalize -> [exact dedup signatures]     (scratch JSONL out)
  exact_find       F tasks  datatrove ExactFindDedups (one hash range each)
  pass2            T tasks  datatrove ExactDedupFilter -> [MinHash signatures]
  minhash_buckets  B tasks  datatrove MinhashDedupBuckets (one band each)
  minhash_cluster  1 task   first kept copy wins (data_pipeline.dt.minhash_stages)
  pass3            T tasks  datatrove MinhashDedupFilter -> [line dedup signatures]
  line_find        F tasks  our line dedup, stage 2
  pass4         4 T tasks  line dedup filter -> heuristics -> language id -> Megatron writer (our tokenizer)
  finalize         1 task   merge per source, report.json, manifest.json

A disabled filter removes its barrier and the passes around it merge. Task ``r`` of a pass reads a
contiguous slice of the sorted input files (balanced by size), so (task, document index) is the local
engine's stream order and every dedup keeps the copy the local engine keeps; scratch files between passes
are ``<rank>.jsonl`` per task. The pass after line dedup (heuristics, language id, tokenizer: most of the
work) re-cuts the surviving documents into ``SLICES_PER_TASK`` x ``tasks`` contiguous slices of equal bytes
(``SliceJsonlReader``), since the dedups drop unevenly across the input slices. ``executor=local``: datatrove's ``LocalPipelineExecutor`` chain, workers forked
from this process. ``slurm``: ``SlurmPipelineExecutor`` arrays chained with ``afterok`` (``--kill-on-invalid-dep``
cancels the rest when a task fails); OUT must be on a filesystem every node sees. ``ray``: datatrove's
``RayPipelineExecutor`` (needs ``pip install ray``). Rerunning the same command skips every task whose
``completions/<rank>`` exists (a task's outputs are rewritten whole when it reruns), so a run killed
anywhere resumes to the same output; other inputs or settings in the same OUT are refused.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datatrove.pipeline.dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter
from datatrove.pipeline.writers import JsonlWriter

from data_pipeline.dt.finalize import Finalize
from data_pipeline.dt.line_dedup import LineDedupFilter, LineDedupFind, LineDedupSignature
from data_pipeline.dt.minhash_stages import FirstKeptCluster, OurMinhashSignature, minhash_config
from data_pipeline.dt.steps import (
    Counted,
    Heuristics,
    KillHook,
    LanguageId,
    Normalize,
    RankJsonlReader,
    ShardWriter,
    SliceJsonlReader,
    SourceReader,
    TaskProbe,
    write_json_atomic,
)
from data_pipeline.readers import infer_format
from data_pipeline.tokenize_shards import PrepareConfig, _diff, _identity, load_pipeline_tokenizer

EXECUTORS = ("local", "slurm", "ray")


@dataclass
class DatatroveConfig:
    """How the datatrove engine runs (the documents and shards do not depend on any of this but ``tasks``)."""

    executor: str = "local"
    """``local`` (this machine), ``slurm`` (job arrays) or ``ray``."""
    tasks: int = 2
    """Tasks per document pass; each reads a contiguous slice of the input files. Part of the run identity."""
    workers: int = 2
    """Tasks running at once (local: processes; slurm: the job array's ``%`` limit)."""
    finder_tasks: int | None = None
    """Tasks of the exact / line dedup finders (hash ranges); default ``tasks``."""
    partition: str | None = None
    """SLURM partition (required for ``slurm``)."""
    time: str = "24:00:00"
    """SLURM time limit per array task."""
    cpus_per_task: int = 1
    """CPUs per SLURM / Ray task."""
    mem_per_cpu_gb: int = 2
    """Memory per CPU (SLURM ``--mem-per-cpu``, Ray)."""
    wait: bool = True
    """slurm: wait for the last job and print the summary (else return after submitting)."""
    poll_s: float = 3.0
    """slurm: seconds between queue polls while waiting."""
    env_command: str | None = None
    """slurm: shell line run before each task (default: activate this Python's venv, if any)."""
    sbatch_args: dict[str, Any] = field(default_factory=dict)
    """Extra ``#SBATCH`` options (``{"account": "x"}``)."""

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        if not 1 <= self.tasks <= 65534:
            raise ValueError(f"--tasks {self.tasks}: expected 1..65534 (exact dedup orders tasks in a uint16)")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: expected >= 1")
        if self.executor == "slurm" and not self.partition:
            raise ValueError("--executor slurm needs --partition (the SLURM partition to submit to)")


SLICES_PER_TASK = 4
"""The last pass (after line dedup) cuts the surviving text into ``tasks * SLICES_PER_TASK`` equal-byte slices:
equal bytes are not equal work (language id costs per document, the tokenizer per token), and with several
slices per worker the local pool hands the next slice to whichever worker is free. Under SLURM each array job
runs ``SLICES_PER_TASK`` consecutive slices (one ``--tasks`` share of the text)."""


@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


def _estimated_bytes(path: Path) -> int:
    """Uncompressed size for balancing: a gzip file's ISIZE trailer (exact for one member), else its size."""
    size = path.stat().st_size
    if path.suffix == ".gz" and size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            return max(size, int.from_bytes(f.read(4), "little"))
    return size


def file_plan(cfg: PrepareConfig, identity: dict[str, Any], tasks: int) -> dict[str, Any]:
    """Every input file in stream order, each given to one task; tasks get contiguous, size-balanced slices."""
    files = []
    for spec, s in zip(cfg.sources, identity["sources"]):
        if spec.format == "hf" and not s["files"]:
            raise ValueError(f"source {spec.name!r}: the datatrove engine reads local files; a hub dataset name "
                             "needs --engine local")
        for f in s["files"]:
            p = Path(f["path"])
            files.append({"source": spec.name, "path": f["path"], "format": spec.format or infer_format(p),
                          "bytes": _estimated_bytes(p)})
    total, before = sum(f["bytes"] for f in files) or 1, 0
    for f in files:
        f["rank"] = min(tasks - 1, int(tasks * (before + f["bytes"] / 2) / total))
        before += f["bytes"]
    return {"tasks": tasks, "sources": [s.name for s in cfg.sources], "files": files}


def _priority(doc: Any) -> int:
    """Exact dedup keeps the highest priority, then the lowest document index: earlier tasks first."""
    return 65535 - doc.metadata["task"]


def _stripped(doc: Any) -> str:
    return doc.text.strip()


def build_stages(cfg: PrepareConfig, dt: DatatroveConfig, out: Path, work: Path) -> list[Stage]:
    c, T = cfg.cleaning, dt.tasks
    F = dt.finder_tasks or T
    sc, w = work / "scratch", str(work)
    stages: list[Stage] = []
    current: list = [SourceReader(str(work / "plan.json"), w)]
    pass_tasks = T

    def close_pass(sink: list, barriers: list[Stage], reader_dir: str | None, first: list, *,
                   rebalance: bool = False) -> None:
        nonlocal current, pass_tasks
        name = f"pass{sum(s.name.startswith('pass') for s in stages) + 1}"
        steps = [current[0], KillHook(name), *current[1:], *sink]
        stages.append(Stage(name, steps, pass_tasks))
        stages.extend(barriers)
        if reader_dir is None:
            current = []
            return
        if rebalance:  # SLICES_PER_TASK slices per task: the workers take them as they free up
            reader, pass_tasks = SliceJsonlReader(reader_dir, tasks=pass_tasks), T * SLICES_PER_TASK
        else:
            reader = RankJsonlReader(reader_dir, compression=None, add_file_path=False)
        current = [reader, *first]

    def scratch_writer(name: str) -> JsonlWriter:
        return JsonlWriter(str(sc / name), output_filename="${rank}.jsonl", compression=None)

    if c.normalize:
        current.append(Normalize(c, w))
    if c.exact_dedup:
        ex = ExactDedupConfig(content_getter=_stripped, document_priority=_priority)
        close_pass([scratch_writer("p1"), ExactDedupSignature(str(sc / "exact_sigs"), ex, finder_workers=F)],
                   [Stage("exact_find", [ExactFindDedups(str(sc / "exact_sigs"), str(sc / "exact_dups"), ex)], F)],
                   str(sc / "p1"), [Counted(ExactDedupFilter(str(sc / "exact_dups"), ex), "exact_dedup",
                                            "exact_duplicate", w)])
    if c.near_dedup:
        mc = minhash_config(c)
        sigs, buckets, remove = str(sc / "minhash_sigs"), str(sc / "minhash_buckets"), str(sc / "minhash_remove")
        close_pass([scratch_writer("p2"), OurMinhashSignature(sigs, cleaning=c)],
                   [Stage("minhash_buckets", [MinhashDedupBuckets(sigs, buckets, config=mc)], mc.num_buckets),
                    Stage("minhash_cluster", [FirstKeptCluster(buckets, remove, sigs, cleaning=c)], 1)],
                   str(sc / "p2"), [Counted(MinhashDedupFilter(remove), "near_dedup", "near_duplicate", w)])
    if c.line_dedup:
        # the signature step stamps each document's line-dedup key before the writer; the next pass, keyed by
        # it, reads equal bytes per task (the filters so far dropped unevenly across the input slices)
        close_pass([LineDedupSignature(str(sc / "line_sigs"), finder_tasks=F, cleaning=c), scratch_writer("p3")],
                   [Stage("line_find", [LineDedupFind(str(sc / "line_sigs"), str(sc / "line_dups"), cleaning=c)], F)],
                   str(sc / "p3"), [LineDedupFilter(str(sc / "line_dups"), cleaning=c, work=w)], rebalance=True)
    if c.heuristics:
        current.append(Heuristics(c, w))
    if c.langid:
        current.append(LanguageId(c, w))
    close_pass([ShardWriter(str(work / "shards"), str(cfg.tokenizer))], [], None, [])
    stages.append(Stage("finalize", [Finalize(str(out), w, keep_shards=cfg.keep_shards)], 1))
    for s in stages:
        s.pipeline = [TaskProbe(s.name, w, end=False), *s.pipeline, TaskProbe(s.name, w, end=True)]
    return stages


def _check_identity(work: Path, identity: dict[str, Any], plan: dict[str, Any]) -> None:
    for name, obj in (("identity.json", identity), ("plan.json", plan)):
        path = work / name
        if path.is_file():
            prev = json.loads(path.read_text())
            if prev != obj:
                what = ", ".join(_diff(prev, obj)) if name == "identity.json" else "input files or --tasks"
                raise ValueError(f"{work}: holds an interrupted datatrove run with different {what}; resume with "
                                 "the same sources, tokenizer, settings and --tasks, or use a fresh --output")
        else:
            write_json_atomic(path, obj)


def prepare_datatrove(cfg: PrepareConfig, dt: DatatroveConfig) -> dict[str, Any] | None:
    """Run or resume (or no-op if complete) with datatrove; the manifest, or None if submitted to SLURM
    without ``wait``."""
    dt.validate()
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if len({s.name for s in cfg.sources}) != len(cfg.sources):
        raise ValueError(f"--source names must be unique, got {[s.name for s in cfg.sources]}")
    identity = {**_identity(cfg, load_pipeline_tokenizer(cfg.tokenizer)),
                "engine": {"name": "datatrove", "tasks": dt.tasks}}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        m = json.loads(manifest_path.read_text())
        if m.get("identity") == identity:
            return m
        raise ValueError(f"{manifest_path}: a finished run with different "
                         f"{', '.join(_diff(m.get('identity', {}), identity))}; use a fresh --output directory")
    work = out / "dt"
    _check_identity(work, identity, file_plan(cfg, identity, dt.tasks))
    (work / "error.txt").unlink(missing_ok=True)
    stages = build_stages(cfg, dt, out, work)
    write_json_atomic(work / "run.json", {"executor": dt.executor, "tasks": dt.tasks, "config": asdict(dt),
                                          "stages": [{"name": s.name, "tasks": s.tasks} for s in stages]})
    executors = _executors(stages, dt, work)
    if dt.executor == "local":
        _preload_for_fork(cfg)
    try:
        executors[-1].run()  # runs (local, ray) or submits (slurm) the whole chain
    finally:
        gc.unfreeze()
    if dt.executor == "slurm":
        jobs = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
        write_json_atomic(work / "slurm_jobs.json", {"submitted": jobs})
        print(f"submitted SLURM jobs {', '.join(jobs) or '(none: every task was complete)'}; logs under "
              f"{work / 'slurm_logs'}", flush=True)
        if not dt.wait:
            return None
        _wait_slurm(stages, dt, work, jobs)
    if not manifest_path.is_file():
        err = work / "error.txt"
        raise RuntimeError(err.read_text().strip() if err.is_file() else
                           f"the datatrove run ended without {manifest_path}; see the logs under {work / 'logs'}")
    return json.loads(manifest_path.read_text())


def _preload_for_fork(cfg: PrepareConfig) -> None:
    """Load the language-id model (~1 s) once here so that forked tasks inherit it, and freeze the heap so that
    the tasks' garbage collector does not copy this process's pages (their private memory is their own)."""
    if cfg.cleaning.langid:
        from data_pipeline.langid import _identifier

        _identifier()
    gc.collect()
    gc.freeze()


def _log_dir(work: Path, i: int, stage: Stage) -> str:
    return str(work / "logs" / f"{i:02d}_{stage.name}")


def _executors(stages: list[Stage], dt: DatatroveConfig, work: Path) -> list[Any]:
    prev, chain = None, []
    for i, s in enumerate(stages):
        if dt.executor == "local":
            from datatrove.executor import LocalPipelineExecutor

            # fork: workers inherit the imported modules and loaded models (forkserver would re-import them
            # per stage, seconds each). A one-task stage still runs in a worker (datatrove runs workers=1 in
            # this process), so that its memory is its own; workers=1 runs everything here (tests).
            prev = LocalPipelineExecutor(s.pipeline, tasks=s.tasks, workers=dt.workers,
                                         logging_dir=_log_dir(work, i, s), depends=prev, start_method="fork")
        elif dt.executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            prefix = sys.prefix if sys.prefix != sys.base_prefix else None
            prev = SlurmPipelineExecutor(
                s.pipeline, tasks=s.tasks, time=dt.time, partition=dt.partition, cpus_per_task=dt.cpus_per_task,
                mem_per_cpu_gb=dt.mem_per_cpu_gb, workers=dt.workers, job_name=f"prep_{s.name}",
                logging_dir=_log_dir(work, i, s), depends=prev, qos="", venv_path=prefix,
                env_command=dt.env_command, sbatch_args={"kill-on-invalid-dep": "yes", **dt.sbatch_args},
                tasks_per_job=max(1, math.ceil(s.tasks / dt.tasks)), mail_type="NONE",
                slurm_logs_folder=str(work / "slurm_logs" / f"{i:02d}_{s.name}"))
        else:
            try:
                import ray  # noqa: F401
                from datatrove.executor import RayPipelineExecutor
            except ImportError as e:
                raise ValueError("--executor ray needs Ray: pip install 'ray[default]' (and a running cluster "
                                 "or none for a local one)") from e
            prev = RayPipelineExecutor(s.pipeline, tasks=s.tasks, workers=dt.workers, depends=prev,
                                       logging_dir=_log_dir(work, i, s), cpus_per_task=dt.cpus_per_task,
                                       mem_per_cpu_gb=dt.mem_per_cpu_gb)
        chain.append(prev)
    return chain


def incomplete_tasks(stages: list[Stage], work: Path) -> dict[str, list[int]]:
    """Per stage, the ranks without a ``completions/<rank>`` marker."""
    out = {}
    for i, s in enumerate(stages):
        done = Path(_log_dir(work, i, s)) / "completions"
        missing = [r for r in range(s.tasks) if not (done / f"{r:05d}").is_file()]
        if missing:
            out[s.name] = missing
    return out


def _wait_slurm(stages: list[Stage], dt: DatatroveConfig, work: Path, jobs: list[str]) -> None:
    """Poll until every stage is complete, or until our jobs have left the queue with tasks unfinished."""
    while incomplete_tasks(stages, work):
        res = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], capture_output=True, text=True,
                             check=False) if jobs else None
        if res is None or res.returncode != 0 or not res.stdout.split():
            time.sleep(dt.poll_s)  # completion markers are written just before a task exits
            todo = incomplete_tasks(stages, work)
            if not todo:
                return
            err = work / "error.txt"
            raise RuntimeError((err.read_text().strip() + "\n" if err.is_file() else "") +
                               f"the SLURM jobs ended with unfinished tasks {todo}; logs: {work / 'slurm_logs'} "
                               f"and {work / 'logs'}; rerun the same command to resume (finished tasks are skipped)")
        time.sleep(dt.poll_s)


def clean_work(out: Path) -> None:
    """Remove the datatrove work directory (logs, scratch) of a finished run."""
    shutil.rmtree(Path(out) / "dt", ignore_errors=True)
