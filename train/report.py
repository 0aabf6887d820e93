"""Plots and a one-page summary of a run directory, from its metrics.jsonl.

    python -m train.report RUN_DIR [--output RUN_DIR/report]

Writes ``loss.png`` (training loss with validation loss on top), ``throughput.png`` (tokens/s and MFU),
``lr.png``, ``grad_norm.png``, ``eval.png`` (the in-loop benchmarks of ``[eval]``: one panel per task, one per
perplexity figure), ``all_metrics.png`` (every numeric key present, one panel each, so other stages,
e.g. PPO, get plots without code here), for PPO runs ``ppo.png`` (rewards, held-out reward, KL, entropy, clip
fraction, value loss, length, time per iteration) and ``summary.md`` (run kind, config, final/best losses, the
named held-out loss, throughput, time, and exactly the plots written). Every run kind works: pretraining, SFT, RM,
PPO, GAtt, DPO, distillation; each stage's own figures come from the JSON files it wrote
(``train/report_stages.py``: SFT answer loss, RM accuracy per test set vs the length baseline and by rating strength +
``rm_accuracy.png``, PPO reward / KL / held-out reward and best iteration, GAtt adherence, DPO held-out
implicit-reward accuracy and margins, distillation held-out KL / student loss / argmax agreement).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

SKIP_KEYS = {"step", "type", "skipped", "spike", "peak_flops", "tokens"}


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl; lines cut by a crash are skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log; is {run_dir} a run directory (--run.dir)?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, validation records); [eval] benchmark records are ``read_benchmarks``'."""
    records = [r for r in read_records(run_dir) if r.get("type") != "benchmark"]
    return ([r for r in records if r.get("type") != "validation"],
            [r for r in records if r.get("type") == "validation"])


def read_benchmarks(run_dir: Path) -> list[dict[str, Any]]:
    """The ``{"type": "benchmark"}`` records of the in-loop evaluation ([eval]), in step order."""
    return [r for r in read_records(run_dir) if r.get("type") == "benchmark"]


def benchmark_panels(records: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, list[int], list[float]]]]]:
    """One panel per task (a line per metric), one per perplexity figure (their scales differ)."""
    keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    by_task: dict[str, list[str]] = {}
    for key in keys:
        _, task, metric = key.split("/", 2)
        by_task.setdefault(key if task == "perplexity" else task, []).append(key)
    return [(name.removeprefix("eval/"), [(k.split("/", 2)[2] if len(group) > 1 else "", *_series(records, k))
                                          for k in group]) for name, group in by_task.items()]


def _series(recs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
           and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(path: Path, title: str, panels: list[tuple[str, list[tuple[str, list[int], list[float]]]]],
          *, log_keys: tuple[str, ...] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (ylabel, lines) in zip(axes.flat, panels):
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ylabel in log_keys:
            ax.set_yscale("log")
        if len(lines) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the PNGs and summary.md (which lists exactly the plots written); returns the output directory."""
    from train.report_stages import run_kind, stage_figures

    run_dir = Path(run_dir)
    out = Path(output) if output else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    train, valid = read_metrics(run_dir)
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no training records yet")
    written = _training_plots(run_dir.name, train, valid, out)
    benchmarks = read_benchmarks(run_dir)
    if benchmarks:
        _plot(out / "eval.png", f"{run_dir.name}: benchmarks during training ([eval])", benchmark_panels(benchmarks))
        written.append("eval.png")
    kind = run_kind(run_dir)
    stage_lines, stage_plots = stage_figures(run_dir, kind, train, out)
    written += stage_plots
    (out / "summary.md").write_text(summarize(run_dir, train, valid, kind=kind, plots=written)
                                    + "\n".join(stage_lines) + summarize_benchmarks(benchmarks))
    return out


def _training_plots(name: str, train: list[dict[str, Any]], valid: list[dict[str, Any]], out: Path) -> list[str]:
    """The curves every loop-based run has (only those whose keys were logged); returns the files written."""
    written = []
    if any("loss" in r for r in train):
        loss_lines = [("train", *_series(train, "loss"))]
        if valid:
            loss_lines.append((valid[-1].get("val_name", "validation"), *_series(valid, "val_loss")))
        _plot(out / "loss.png", f"{name}: loss", [("loss (nats)", loss_lines)])
        written.append("loss.png")
    if any("tokens_per_s" in r for r in train):
        _plot(out / "throughput.png", f"{name}: throughput",
              [("tokens/s", [("", *_series(train, "tokens_per_s"))]), ("MFU", [("", *_series(train, "mfu"))])])
        written.append("throughput.png")
    for key in ("lr", "grad_norm"):
        if any(key in r for r in train):
            _plot(out / f"{key}.png", f"{name}: {key}", [(key, [("", *_series(train, key))])])
            written.append(f"{key}.png")
    keys = sorted({k for r in train for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                  - SKIP_KEYS)
    panels = [(k, [("", *_series(train, k))]) for k in keys]
    panels += [(k, [("", *_series(valid, k))]) for k in ("val_loss", "val_ppl") if any(k in r for r in valid)]
    _plot(out / "all_metrics.png", f"{name}: every logged metric", panels)
    written.append("all_metrics.png")
    if any(r.get("type") == "ppo" for r in train):
        _plot(out / "ppo.png", f"{name}: PPO", [(label, [(k.replace("reward/", "") if len(keys) > 1 else "",
                                                          *_series(train, k)) for k in keys])
                                               for label, keys in PPO_PANELS])
        written.append("ppo.png")
    return written


def summarize_benchmarks(records: list[dict[str, Any]]) -> str:
    """The last in-loop evaluation's figures (and the first, to compare), for summary.md."""
    if not records:
        return ""
    first, last = records[0], records[-1]
    lines = [f"## Benchmarks during training ([eval], {len(records)} evaluations; eval.png)", "",
             f"| metric | step {first['step']} | step {last['step']} |", "|---|---|---|"]
    for key in sorted(k for k in last if k.startswith("eval/")):
        lines.append(f"| {key.removeprefix('eval/')} | {first.get(key, float('nan')):.4g} | {last[key]:.4g} |")
    return "\n".join(lines) + "\n"


# The curves of a PPO run (rlhf/ppo/metrics.py): one panel per entry, a line per key.
PPO_PANELS: list[tuple[str, list[str]]] = [
    ("reward (probability)", ["reward/helpful", "reward/safety", "reward/combined"]),
    ("held-out LOGIT(Rc)", ["heldout/reward/logit_combined"]),
    ("held-out reward", ["heldout/reward/helpful", "heldout/reward/safety",
                         "heldout/reward/safety_on_safety_prompts"]),
    ("KL to reference (nats/seq)", ["kl", "heldout/kl"]),
    ("entropy (nats/token)", ["entropy"]),
    ("clip fraction", ["clip_fraction"]),
    ("value loss", ["value_loss"]),
    ("response length", ["response_length"]),
    ("seconds", ["gen_time_s", "score_time_s", "train_time_s"]),
]


def _trained_model_config(run_dir: Path) -> Any:
    """The exported model's own config (a stage that started from a checkpoint took its shape), or None."""
    from model.checkpoints.native import is_native_dir, read_native_config

    final = run_dir / "final_model"
    return read_native_config(final) if final.is_dir() and is_native_dir(final) else None


def summarize(run_dir: Path, train: list[dict[str, Any]], valid: list[dict[str, Any]], *, kind: str = "pretrain",
              plots: list[str] | None = None) -> str:
    last = train[-1]
    losses = [r["loss"] for r in train if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    lines = [f"# Run summary: {run_dir}", "", f"- run kind: {kind}"]
    if (run_dir / "config.toml").is_file():
        from train.config import RunConfig, tomllib

        # A stage's config.toml is the run sections plus its own ([sft], [rm], [gatt]): read the run sections
        # (not [eval]: PPO has a section of that name with other keys, and the summary does not need it).
        tables = tomllib.loads((run_dir / "config.toml").read_text())
        cfg = RunConfig.from_dict({k: v for k, v in tables.items() if k in RunConfig.sections() and k != "eval"},
                                  source=str(run_dir / "config.toml"))
        m = _trained_model_config(run_dir) or cfg.model_config()
        # SFT and RM runs read their own files ([sft] files, [rm] helpful_files / safety_files), not data.path
        stage = tables.get("sft") or tables.get("rm") or {}
        files = [str(stage[k]) for k in ("files", "helpful_files", "safety_files") if stage.get(k)]
        source = "synthetic" if cfg.data.synthetic else (cfg.data.path or ", ".join(files) or "(not recorded)")
        lines += [f"- model: {m.name} ({m.num_params() / 1e6:.2f}M parameters, dim {m.dim}, {m.n_layers} layers, "
                  f"vocab {m.vocab_size})",
                  f"- data: {source}, seq_len {cfg.data.seq_len}, "
                  f"global batch {cfg.train.global_batch_size} sequences ({cfg.train.global_batch_size * cfg.data.seq_len:,}"
                  f" tokens), micro-batch {cfg.train.micro_batch_size}",
                  f"- optimizer: AdamW lr {cfg.optim.lr:g} (warmup {cfg.optim.warmup_steps}, cosine to "
                  f"{cfg.optim.min_lr_ratio:g}x), wd {cfg.optim.weight_decay:g}, clip {cfg.optim.grad_clip:g}; "
                  f"dtype {cfg.train.dtype}; tp {cfg.parallel.tp} cp {cfg.parallel.cp} pp {cfg.parallel.pp} "
                  f"ZeRO-{cfg.zero.stage}"]
    lines += [f"- steps logged: {len(train)} (last step {last['step']})"]
    if losses:
        lines += [f"- training loss: first {losses[0]:.4f}, final {losses[-1]:.4f}, best {min(losses):.4f}"]
    if valid:
        best, final = min(valid, key=lambda r: r["val_loss"]), valid[-1]
        ppl = f" (perplexity {final['val_ppl']:.2f})" if "val_ppl" in final else ""
        lines += [f"- {final.get('val_name', 'validation loss')}: final {final['val_loss']:.4f}{ppl} at "
                  f"step {final['step']}; best {best['val_loss']:.4f} at step {best['step']}"]
    if "tokens_per_s" in last:
        steady = train[1:] or train  # the first step pays warm-up costs
        lines += [f"- throughput: median {statistics.median(r['tokens_per_s'] for r in steady):,.0f} tokens/s, "
                  f"median MFU {100 * statistics.median(r['mfu'] for r in steady):.1f}% "
                  f"(peak {last.get('peak_flops', float('nan')) / 1e12:.2f} TFLOP/s per device), "
                  f"median step {statistics.median(r['step_time_s'] for r in steady):.3f} s"]
    if "elapsed_s" in last:
        lines += [f"- wall time of the last session: {last['elapsed_s']:.0f} s"]
    skipped = sum(1 for r in train if r.get("skipped"))
    spikes = sum(1 for r in train if r.get("spike"))
    lines += [f"- health: {skipped} skipped (non-finite) steps, {spikes} loss spikes", "",
              "Plots: " + (", ".join(plots) if plots else "none"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--output", default=None, help="default: RUN_DIR/report")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.run_dir, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((out / "summary.md").read_text())
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
