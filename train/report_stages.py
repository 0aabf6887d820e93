"""Each stage's own figures for ``python -m train.report``, read from the JSON files the stage wrote into its run
directory (train/ imports no stage code: only file names and keys are shared).

    kind = run_kind(run_dir)                        # "pretrain", "sft", "rm", "ppo", "gatt" (config.toml's sections)
    lines, plots = stage_figures(run_dir, kind, records, out_dir)

- SFT: ``sft_eval.json``: held-out answer-token loss before and after, over every held-out row.
- RM: ``heldout_eval.json``: accuracy per test set against the length-only baseline, and by rating strength;
  ``rm_accuracy.png``.
- PPO: the ``"type": "ppo"`` records: reward, KL, held-out reward (first, best and its iteration, last).
- GAtt: ``adherence.json`` of ``python -m rlhf.gatt eval --output RUN_DIR/eval`` (adherence per turn), if run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STAGE_SECTIONS = {"sft": "sft", "rm": "rm", "ppo": "ppo", "gatt": "gatt", "dpo": "dpo", "distill": "distill"}
"""config.toml section -> run kind (a run with none of them is pretraining)."""


def run_kind(run_dir: Path) -> str:
    """The kind of run, from the sections of its ``config.toml`` (``pretrain`` without one)."""
    from train.config import tomllib

    path = run_dir / "config.toml"
    if (run_dir / "ppo_config.toml").is_file():  # rlhf.ppo's own name for it
        return "ppo"
    if not path.is_file():
        return "pretrain"
    tables = tomllib.loads(path.read_text())
    return next((kind for section, kind in STAGE_SECTIONS.items() if section in tables), "pretrain")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def stage_figures(run_dir: Path, kind: str, records: list[dict[str, Any]], out: Path) -> tuple[list[str], list[str]]:
    """(markdown lines, plot files written) of the stage's own figures; nothing for pretraining."""
    figures = {"sft": _sft, "rm": _rm, "ppo": _ppo, "gatt": _gatt, "dpo": _dpo, "distill": _distill}
    return figures.get(kind, lambda *a: ([], []))(run_dir, records, out)


def _one_line(file: str, title: str, missing: str, line: Any) -> Any:
    """A stage whose figure is one line read from the JSON file it wrote (``line(ev)``), or says why it is missing."""
    def figures(run_dir: Path, records: list[dict[str, Any]], out: Path) -> tuple[list[str], list[str]]:
        ev = _read(run_dir / file)
        if not ev:
            return [f"## {title}", "", f"- no {file} ({missing})", ""], []
        return [f"## {title}", "", f"- {line(ev)}", ""], []
    return figures


_sft = _one_line("sft_eval.json", "SFT", "the run did not complete, or had no held-out rows", lambda ev: (
    f"held-out answer-token loss over all {ev.get('heldout_rows')} held-out rows "
    f"({int(ev.get('heldout_answer_tokens', 0))} answer tokens): before {_fmt(ev['heldout_loss_before'], '.4f')}, "
    f"after {_fmt(ev['heldout_loss_after'], '.4f')}"))
_dpo = _one_line("dpo_eval.json", "DPO (held-out pairs)", "the run did not complete, or had no held-out pairs",
                 lambda ev: (
    f"implicit-reward accuracy {_fmt(ev.get('accuracy'))} +- {_fmt(ev.get('accuracy_stderr'))} over "
    f"{ev.get('heldout_pairs')} pairs ({ev.get('ties', 0)} ties); mean margin {_fmt(ev.get('mean_margin'), '.4f')} "
    f"(chosen {_fmt(ev.get('mean_chosen_reward'), '.4f')}, rejected {_fmt(ev.get('mean_rejected_reward'), '.4f')})"))
_distill = _one_line("distill_eval.json", "Distillation (held-out)", "the run did not complete, or had no held-out rows",
                     lambda ev: (
    f"student loss {_fmt(ev.get('student_loss'), '.4f')} (teacher {_fmt(ev.get('teacher_loss'), '.4f')}), forward KL "
    f"to the teacher {_fmt(ev.get('kl'), '.4f')}, argmax agreement {_fmt(ev.get('argmax_agreement'))}"))


def _rm(run_dir: Path, records: list[dict[str, Any]], out: Path) -> tuple[list[str], list[str]]:
    ev = _read(run_dir / "heldout_eval.json")
    if not ev:
        return ["## Reward model", "", "- no heldout_eval.json (the run did not complete)", ""], []
    lines = ["## Reward model (held-out pairs)", "", "| test set | pairs | accuracy | length baseline | mean margin |",
             "|---|---|---|---|---|"]
    for name, r in ev.items():
        lines.append(f"| {name} | {r['pairs']} | {_fmt(r['accuracy'])} | {_fmt(r['length_baseline'])} | "
                     f"{_fmt(r['mean_margin'])} |")
    buckets = [(name, rating, b) for name, r in ev.items() for rating, b in r.get("per_rating", {}).items()]
    if buckets:
        lines += ["", "By rating strength:", "", "| test set | rating | pairs | accuracy | mean margin |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {rating} | {b['pairs']} | {_fmt(b['accuracy'])} | {_fmt(b['mean_margin'])} |"
                  for n, rating, b in buckets]
    weak = [n for n, r in ev.items() if not r["accuracy"] > max(0.5, r["length_baseline"])]
    if weak:
        lines += ["", f"- WEAK: {', '.join(weak)}: accuracy at or below chance / the length baseline"]
    _bar_plot(out / "rm_accuracy.png", ev)
    return lines + [""], ["rm_accuracy.png"]


def _bar_plot(path: Path, ev: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ev)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(names), 3.4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [ev[n]["accuracy"] for n in names], width=0.4, label="reward model")
    ax.bar([x + 0.2 for x in xs], [ev[n]["length_baseline"] for n in names], width=0.4, label="length baseline")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ppo(run_dir: Path, records: list[dict[str, Any]], out: Path) -> tuple[list[str], list[str]]:
    ppo = [r for r in records if r.get("type") == "ppo"]
    if not ppo:
        return ["## PPO", "", "- no PPO iterations logged", ""], []
    key = "heldout/reward/logit_combined"
    held = [r for r in ppo if isinstance(r.get(key), (int, float))]
    lines = ["## PPO", "", f"- iterations: {len(ppo)}; reward (combined, probability) first "
             f"{_fmt(ppo[0].get('reward/combined'))}, last {_fmt(ppo[-1].get('reward/combined'))}; KL to the "
             f"reference last {_fmt(ppo[-1].get('kl'))} nats/sequence"]
    if held:
        best = max(held, key=lambda r: r[key])
        lines.append(f"- held-out LOGIT(Rc): first {_fmt(held[0][key])} (iteration {held[0]['step']}), best "
                     f"{_fmt(best[key])} at iteration {best['step']} (best_policy/), last {_fmt(held[-1][key])}")
    return lines + [""], []


def _gatt(run_dir: Path, records: list[dict[str, Any]], out: Path) -> tuple[list[str], list[str]]:
    found = next((p for p in (run_dir / "adherence.json", run_dir / "eval" / "adherence.json") if p.is_file()), None)
    if found is None:
        return ["## GAtt", "", "- adherence not measured yet: python -m rlhf.gatt eval --checkpoint "
                f"{run_dir}/final_model ... --output {run_dir}/eval", ""], []
    models = (_read(found) or {}).get("models", {})
    if not models:
        return ["## GAtt", "", f"- {found}: no models", ""], []
    turns = max(len(m["adherence"]) for m in models.values())
    lines = ["## GAtt adherence (instruction in the first message only)", "", f"from {found}", "",
             "| model | " + " | ".join(f"turn {i + 1}" for i in range(turns)) + " |", "|---" * (turns + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(_fmt(r["rate"], ".2f") for r in m["adherence"]) + " |"
              for label, m in models.items()]
    return lines + [""], []
