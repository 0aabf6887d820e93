"""Pre-flight: before any allocation (model, optimizer, data index), does the run fit this machine?

    check_memory(cfg, model_cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))   # ConfigError when not
    for line in check_data(cfg, model_cfg, world_size=...): print(line)   # epochs + index size per source

The estimate is the training state of one process (``state_bytes_per_process``): weights, gradients and AdamW
states of its TP x PP share of the parameters, divided by ZeRO as its stage shards them. That is 16 bytes per
parameter unsharded (fp32: 4 weights + 4 grads + 8 Adam; bf16: 2 + 2 + 4 master + 8 Adam), the figure of
``python -m launch plan`` without activations: a lower bound, so a refusal is certain, a pass is not a promise.
The machine's memory: the GPU's total memory on CUDA, else the RAM (``/proc/meminfo`` MemTotal, or the cgroup
limit when lower) shared by the processes of this node (``LOCAL_WORLD_SIZE``).

Data (``check_data``, a prepared ``data.path``): megatron repeats a corpus for as many epochs as the requested
samples need and builds its document / sample / shuffle indices over all of them at once, so a long run on a
small corpus (Llama 2 7B's 476,837 steps on a sample corpus) needs more memory for the index than the machine
has and fails after a minute with a raw allocation error; the plan (``data_pipeline.loader.sample_index_plan``)
reads only the ``.idx`` files and refuses with the epochs, the index size and the steps that fit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from train.config_reader import ConfigError

GIB = 1024**3


def state_bytes_per_process(model_cfg: Any, *, tp: int, pp: int, dp: int, zero_stage: int, dtype: str,
                            offload: bool = False) -> float:
    """Weights + grads + optimizer states of one process's parameters, in bytes (see the module docstring)."""
    params = model_cfg.num_params() / (tp * pp)
    width = 2 if dtype == "bf16" else 4
    master = 4 if dtype == "bf16" else 0  # fp32 master weights next to the bf16 ones
    weights = width * params / (dp if zero_stage >= 3 else 1)
    grads = width * params / (dp if zero_stage >= 2 else 1)
    optimizer = 0.0 if offload else (8 + master) * params / (dp if zero_stage >= 1 else 1)
    return weights + grads + optimizer


def machine_memory() -> tuple[float, str]:
    """(bytes one process may use, what it is) on this machine."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), f"GPU memory of {props.name}"
    total = _meminfo_total()
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        total = limit
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = f" shared by {local} processes" if local > 1 else ""
    return total / local, f"CPU RAM{share}"


def _meminfo_total() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cgroup_limit() -> float | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return float(text)
    return None


def check_memory(cfg: Any, model_cfg: Any, *, world_size: int) -> None:
    """Refuse (``ConfigError``, with the estimate, the machine's figure and the fix) when the training state of
    one process alone exceeds this machine's memory for it."""
    if not cfg.train.preflight:
        return
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = max(1, world_size // (tp * pp))
    need = state_bytes_per_process(model_cfg, tp=tp, pp=pp, dp=dp, zero_stage=cfg.zero.stage,
                                   dtype=cfg.train.dtype, offload=cfg.zero.offload)
    have, what = machine_memory()
    if need <= have:
        return
    per_param = need / (model_cfg.num_params() / (tp * pp))
    raise ConfigError(
        f"model.name={model_cfg.name!r} ({model_cfg.num_params() / 1e9:.2f}B parameters) needs ~{need / GIB:.0f} GiB "
        f"per process here for weights, gradients and AdamW states alone ({per_param:.0f} B/param at tp={tp} "
        f"pp={pp} dp={dp} ZeRO-{cfg.zero.stage}, {cfg.train.dtype}); this machine has {have / GIB:.0f} GiB "
        f"({what}). Use a smaller model (--model.name debug_15m), or launch on GPUs with enough of them to shard it "
        f"(see `python -m launch plan {model_cfg.name}`), or pass --train.preflight=false to try anyway")


def check_data(cfg: Any, model_cfg: Any, *, world_size: int) -> list[str]:
    """The data half of the pre-flight, for a prepared ``data.path`` (pretraining): what megatron's sample index
    for ``train.steps x train.global_batch_size`` sequences of ``data.seq_len`` (and the validation samples)
    would be: per source and split the epochs it repeats the data and the index bytes
    (``data_pipeline.loader.sample_index_plan``). Refuses (``ConfigError`` naming the file, the keys and the
    fix) when a split has no tokens (megatron would loop forever) or when the indices plus the training state
    exceed this machine's memory for one process; else returns one line per split to print (each source's tokens and epochs, the index size)."""
    if not cfg.train.preflight or cfg.data.synthetic or not cfg.data.path:
        return []
    path = Path(cfg.data.path)
    if not (path / "manifest.json").is_file():
        return []  # not a prepared directory: the data builder names what it expected
    from data_pipeline.loader import sample_index_plan

    t, seq = cfg.train, cfg.data.seq_len
    dp = max(1, cfg.dp_size(world_size))
    n_train = t.steps * t.global_batch_size
    n_valid = t.eval_batches * t.micro_batch_size * dp if t.eval_every > 0 else 0
    try:
        plan = sample_index_plan(data_dir_or_blend=path, seq_len=seq, split=cfg.data.split,
                                 num_samples=(n_train, n_valid, 0))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.path={cfg.data.path!r}: {err}") from err
    keys = {"train": f"train.steps={t.steps} x train.global_batch_size={t.global_batch_size}",
            "valid": f"train.eval_batches={t.eval_batches} x train.micro_batch_size={t.micro_batch_size} x dp={dp}"}
    for row in plan:
        if row["tokens"] == 0:
            raise ConfigError(f"data.path={cfg.data.path!r}: the {row['split']} split of source {row['source']!r} "
                              f"({row['prefix']}.idx, data.split={cfg.data.split!r}) has {row['documents']} "
                              "documents and no tokens; prepare more data or change data.split")
    lines = [f"data {split} ({n:,} sequences of {seq}): " + ", ".join(
        f"{r['source']} {r['tokens']:,} tokens x {r['epochs']} epoch(s)" for r in plan if r["split"] == split)
        + f"; index ~{sum(r['index_bytes'] for r in plan if r['split'] == split) / 2**20:,.1f} MiB"
        for split, n in (("train", n_train), ("valid", n_valid)) if any(r["split"] == split for r in plan)]
    index = sum(r["index_bytes"] for r in plan)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    state = state_bytes_per_process(model_cfg, tp=tp, pp=pp, dp=max(1, world_size // (tp * pp)),
                                    zero_stage=cfg.zero.stage, dtype=cfg.train.dtype, offload=cfg.zero.offload)
    have, what = machine_memory()
    if index + state <= have:
        return lines
    worst = max(plan, key=lambda r: r["index_bytes"])
    train_rows = [r for r in plan if r["split"] == "train"]
    # the steps at which every source's train split is read at most once (a blend samples by weight)
    one_pass = min(((r["tokens"] - 1) // seq) * n_train // max(1, r["samples"]) for r in train_rows) \
        // t.global_batch_size if train_rows else 0
    # the index grows with the steps (epochs x documents, samples): 90% of what is left after the state
    fits = int(t.steps * 0.9 * max(0.0, have - state) / index)
    one = (f"one pass over the data is {one_pass} steps" if one_pass else
           f"the data holds less than one step of {t.global_batch_size} x {seq} tokens")
    raise ConfigError(
        f"data.path={cfg.data.path!r}: the {worst['split']} split of source {worst['source']!r} "
        f"({worst['prefix']}.idx: {worst['documents']:,} documents, {worst['tokens']:,} tokens) would be repeated "
        f"{worst['epochs']:,} epochs for {keys[worst['split']]} sequences of data.seq_len={seq}; megatron's sample "
        f"indices need ~{index / GIB:.1f} GiB ({worst['source']} {worst['split']}: {worst['index_bytes'] / GIB:.1f} "
        f"GiB) besides ~{state / GIB:.1f} GiB of training state; this machine has {have / GIB:.0f} GiB ({what}). "
        f"Use --train.steps={fits} or fewer ({one}), prepare more data (python -m data_pipeline prepare), "
        "or pass --train.preflight=false to try anyway")
