"""The Llama 2 and Llama 3 recipes as one command each. Llama 2: SFT -> helpfulness RM -> safety RM -> RM evaluation -> rejection sampling ->
PPO -> GAtt (data, fine-tuning, adherence), each stage a run directory under ``--run-dir``, finished stages
skipped, each stage's key figure printed, its ``summary.md`` written, one summary table at the end.

    python -m rlhf.recipe llama2 --pretrained runs/tiny_real --run-dir runs/llama2_tiny
    python -m rlhf.recipe llama2 --pretrained runs/tiny_real --run-dir runs/llama2_tiny \\
        --set sft:--train.steps=5 --set ppo:--ppo.iterations=2      # any stage's overrides (repeatable)

A recipe is a small registry (``RECIPES``): an ordered list of ``Stage`` (name, the command it runs, the key figure
it reports). The commands are the README's ("Alignment I"), with the presets of ``configs/rlhf/*_hh_tiny.toml`` and
their directories replaced by the run directory's: ``RUN/sft``, ``RUN/rm_helpful``, ``RUN/rm_safety``,
``RUN/eval_rm``, ``RUN/rs``, ``RUN/ppo``, ``RUN/gatt_data``, ``RUN/gatt`` (its adherence in ``gatt/eval``),
``RUN/gatt_eval``. A stage is finished when its ``STAGE_DONE.json`` exists (written after its command exited 0); an unfinished one is run again and resumes from its own checkpoints. Writes
``RUN/recipe_summary.md``.

The Llama 3 post-training recipe runs through the same driver: SFT and the helpfulness RM as above, then the rounds
of ``rlhf.rounds`` (rejection sampling -> SFT -> DPO variants -> averaging, ``configs/rlhf/llama3_rounds_tiny.toml``)
from that SFT model with that RM, in ``RUN/rounds`` (the rounds driver skips its own finished steps too):

    python -m rlhf.recipe llama3 --pretrained runs/tiny_real --run-dir runs/llama3_tiny \
        --set rounds:--rounds.count=1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.paths import data_dir
from train.config_reader import ConfigError, FlagHelpFormatter

DONE = "STAGE_DONE.json"


@dataclass(frozen=True)
class Stage:
    name: str
    """Run directory under --run-dir, and the name in --set NAME:... and the summary."""
    command: Callable[[argparse.Namespace, Path], list[str]]
    """The stage's ``python -m ...`` arguments (after ``python``), given the CLI args and the run directory."""
    figure: Callable[[Path], str]
    """The stage's key figure, read from what it wrote."""
    summary: Callable[[Path], Path] | None = None
    """Given the stage's directory, writes (if needed) and returns its ``summary.md``; default ``train.report``'s
    ``DIR/report/summary.md`` (plots + the stage's own figures)."""


def _train_report(stage_dir: Path) -> Path:
    from train.report import write_report

    done = stage_dir / "report" / "summary.md"  # written once the stage finished; a skipped stage keeps it
    return done if done.is_file() else write_report(stage_dir) / "summary.md"


def _eval_rm_summary(stage_dir: Path) -> Path:
    from rlhf.reward.evaluate import write_summary

    done = stage_dir / "summary.md"  # rlhf.evaluate_rm writes it next to eval_rm.json
    return done if done.is_file() else write_summary(stage_dir, json.loads((stage_dir / "eval_rm.json").read_text()))


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _sft_figure(run: Path) -> str:
    ev = _read(run / "sft" / "sft_eval.json")
    return (f"held-out answer-token loss {ev['heldout_loss_before']:.4f} -> {ev['heldout_loss_after']:.4f}"
            if ev else "no sft_eval.json")


def _rm_figure(name: str) -> Callable[[Path], str]:
    def figure(run: Path) -> str:
        ev = _read(run / name / "heldout_eval.json")
        if not ev:
            return "no heldout_eval.json"
        return "; ".join(f"{k}: accuracy {v['accuracy']:.3f} (length baseline {v['length_baseline']:.3f})"
                         for k, v in ev.items())
    return figure


def _eval_figure(run: Path) -> str:
    ev = _read(run / "eval_rm" / "eval_rm.json")
    if not ev:
        return "no eval_rm.json"
    # A model's entry holds one mapping per test set plus scalars (``truncated_sequences``): the test sets are
    # ``length_baseline``'s keys, so iterate those rather than everything under the model.
    return "; ".join(f"{m} on {s}: {per_set[s]['accuracy']:.3f} (length baseline {base:.3f})"
                     for m, per_set in ev["models"].items() for s, base in ev["length_baseline"].items()
                     if s in per_set)


def _ppo_figure(run: Path) -> str:
    path = run / "ppo" / "metrics.jsonl"
    key = "heldout/reward/logit_combined"
    held = [r for r in map(json.loads, path.read_text().splitlines()) if key in r] if path.is_file() else []
    if not held:
        return "no held-out evaluation logged"
    best = max(held, key=lambda r: r[key])
    return f"held-out LOGIT(Rc) {held[0][key]:.3f} -> best {best[key]:.3f} at iteration {best['step']}"


def _rs_figure(run: Path) -> str:
    rep = _read(run / "rs" / "report.json")
    if not rep:
        return "no report.json"
    return (f"best-of-{rep['k']} {rep['mean_best_of_k']:.3f} vs one sample {rep['mean_single_sample']:.3f} "
            f"(gain {rep['gain_best_of_k_over_single']:+.3f}) over {rep['prompts']} prompts")


def _rs_summary(stage_dir: Path) -> Path:
    """Rejection sampling writes report.json only: its summary.md is the best-of-k curve and the counts."""
    rep = json.loads((stage_dir / "report.json").read_text())
    curve = ", ".join(f"{v:.3f}" for v in rep["best_of_k_curve"])
    path = stage_dir / "summary.md"
    path.write_text(f"# rejection sampling round {rep['round']} ({rep['split']} prompts)\n\n"
                    f"- {rep['prompts']} prompts x {rep['k']} samples at temperature {rep['temperature']}\n"
                    f"- mean best-of-k for k = 1..{rep['k']}: {curve}\n"
                    f"- gain of best-of-{rep['k']} over one sample: {rep['gain_best_of_k_over_single']:+.3f}\n"
                    f"- empty samples {rep['empty_samples']}, prompts without an answer {rep['prompts_without_answer']}"
                    f"\n- reward models: {', '.join(rep['reward_models'])}\n- SFT data of the next round: best.jsonl\n")
    return path


def _gatt_data_figure(run: Path) -> str:
    path = run / "gatt_data" / "gatt.jsonl"
    n = len(path.read_text().splitlines()) if path.is_file() else 0
    return f"{n} GAtt dialogues sampled from the PPO policy (instruction kept in the first user turn only)"


def _gatt_data_summary(stage_dir: Path) -> Path:
    path = stage_dir / "summary.md"
    path.write_text(f"# GAtt data\n\n- {_gatt_data_figure(stage_dir.parent)}: `{stage_dir / 'gatt.jsonl'}`\n")
    return path


def _gatt_figure(run: Path) -> str:
    path = run / "gatt" / "metrics.jsonl"
    losses = [r["loss"] for r in map(json.loads, path.read_text().splitlines())
              if r.get("type") == "train" and "loss" in r] if path.is_file() else []
    return f"last-turn loss {losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} steps logged)" if losses else "no loss"


def _gatt_eval_figure(run: Path) -> str:
    ev = _read(run / "gatt" / "eval" / "adherence.json")
    if not ev:
        return "no adherence.json"
    def later(rows: list[dict[str, Any]]) -> str:  # turns 2+: where the instruction is no longer in the message
        total = sum(r["total"] for r in rows[1:])
        return f"{sum(r['adherent'] for r in rows[1:]) / total:.0%}" if total else "n/a"
    return "adherence at turns 2+: " + ", ".join(f"{label} {later(m['adherence'])}" for label, m in ev["models"].items())


def _gatt_eval_summary(stage_dir: Path) -> Path:
    from train.report import write_report

    done = stage_dir.parent / "gatt" / "report" / "summary.md"  # the GAtt run's report, once with its adherence
    return done if done.is_file() and "## GAtt adherence" in done.read_text() else (
        write_report(stage_dir.parent / "gatt") / "summary.md")


def _common(args: argparse.Namespace) -> list[str]:
    return [f"--data.tokenizer={args.tokenizer}", "--logging.wandb=false"]


SFT = Stage("sft", lambda a, r: ["-m", "rlhf.sft", "--config", "configs/rlhf/sft_hh_tiny.toml", *_common(a),
                                 f"--sft.init_checkpoint={a.pretrained}", f"--run.dir={r / 'sft'}"], _sft_figure)


def reward_stage(kind: str, preset: str) -> Stage:
    """A reward model trained from the recipe's SFT model (``RUN/rm_KIND``)."""
    return Stage(f"rm_{kind}", lambda a, r: [
        "-m", "rlhf.reward", "--config", f"configs/rlhf/{preset}.toml", *_common(a),
        f"--rm.init_checkpoint={r / 'sft'}", f"--run.dir={r / f'rm_{kind}'}"], _rm_figure(f"rm_{kind}"))


LLAMA2: list[Stage] = [
    SFT,
    *[reward_stage(kind, preset) for kind, preset in (("helpful", "rm_helpfulness_hh_tiny"),
                                                      ("safety", "rm_safety_hh_tiny"))],
    Stage("eval_rm", lambda a, r: ["-m", "rlhf.evaluate_rm", "--checkpoint", str(r / "rm_helpful"),
                                   str(r / "rm_safety"), "--data", f"{a.data}/preferences/hh-rlhf/helpful-base/"
                                   "test.jsonl.gz", f"{a.data}/preferences/hh-rlhf/harmless-base/test.jsonl.gz",
                                   "--out", str(r / "eval_rm")], _eval_figure, _eval_rm_summary),
    # Llama 2's rejection sampling (sec. 3.2.3): best-of-K answers of the SFT policy on the RMs' train-side prompts
    # (best.jsonl, the SFT data of a next round); the policy's shape, tokenizer and template come from its export.
    Stage("rs", lambda a, r: ["-m", "rlhf.rejection_sampling", "--policy", str(r / "sft"), "--reward-model",
                              str(r / "rm_helpful"), "--safety-reward-model", str(r / "rm_safety"), "--prompts",
                              f"{a.data}/preferences/hh-rlhf/helpful-base/test.jsonl.gz",
                              f"{a.data}/preferences/hh-rlhf/harmless-base/test.jsonl.gz", "--split", "train",
                              "--out", str(r / "rs")], _rs_figure, _rs_summary),
    Stage("ppo", lambda a, r: ["-m", "rlhf.ppo", "--config", "configs/rlhf/ppo_hh_tiny.toml", *_common(a),
                               f"--ppo.init={r / 'sft'}", f"--reward.helpful={r / 'rm_helpful'}",
                               f"--reward.safety={r / 'rm_safety'}", f"--run.dir={r / 'ppo'}"], _ppo_figure),
    # Ghost Attention (sec. 3.3) on the PPO policy: dialogues answered with the instruction on every user turn,
    # fine-tuned with it in the first only, adherence per turn before/after on other instructions (--seed 1).
    Stage("gatt_data", lambda a, r: ["-m", "rlhf.gatt", "build", "--checkpoint", str(r / "ppo"), "--dialogues",
                                     f"{a.data}/preferences/hh-rlhf", "--output", str(r / "gatt_data" / "gatt.jsonl")],
          _gatt_data_figure, _gatt_data_summary),
    Stage("gatt", lambda a, r: ["-m", "rlhf.gatt", "train", "--config", "configs/rlhf/gatt_tiny.toml", *_common(a),
                                f"--gatt.init={r / 'ppo'}", f"--data.path={r / 'gatt_data' / 'gatt.jsonl'}",
                                f"--run.dir={r / 'gatt'}"], _gatt_figure),
    Stage("gatt_eval", lambda a, r: ["-m", "rlhf.gatt", "eval", "--checkpoint", str(r / "ppo"), "--label", "before",
                                     "--checkpoint", str(r / "gatt"), "--label", "after", "--dialogues",
                                     f"{a.data}/preferences/hh-rlhf", "--num", "64", "--seed", "1",
                                     "--output", str(r / "gatt" / "eval")], _gatt_eval_figure, _gatt_eval_summary),
]

ROUNDS_PRESET = "configs/rlhf/llama3_rounds_tiny.toml"


def _rounds_command(a: argparse.Namespace, r: Path) -> list[str]:
    """``rlhf.rounds`` on its tiny preset, started from the recipe's SFT model and helpfulness RM; the recipe's
    tokenizer is appended to the preset's own SFT and DPO overrides (the stage presets name the quickstart's)."""
    from rlhf.rounds import RoundsConfig

    preset = RoundsConfig.from_toml(ROUNDS_PRESET).rounds
    mine = [f"--data.tokenizer={a.tokenizer}", "--logging.wandb=false"]
    return ["-m", "rlhf.rounds", "--config", ROUNDS_PRESET, f"--rounds.dir={r / 'rounds'}",
            f"--rounds.init_checkpoint={r / 'sft'}", f"--rounds.reward_model={r / 'rm_helpful'}",
            "--rounds.sft_overrides=" + ",".join([*preset.sft_overrides, *mine]),
            "--rounds.dpo_overrides=" + ",".join([*preset.dpo_overrides, *mine])]


def _rounds_figure(run: Path) -> str:
    """The last finished round's line of the rounds table (``round_N/summary.json``)."""
    done = sorted((run / "rounds").glob("round_*/summary.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not done:
        return "no round finished"
    s = json.loads(done[-1].read_text())
    parts = [f"round {s['round']}"]
    if s.get("best_of_k_gain") is not None:
        parts.append(f"best-of-K gain {s['best_of_k_gain']:+.3f}")
    if s.get("dpo_accuracy") is not None:
        parts.append(f"DPO held-out implicit-reward accuracy {s['dpo_accuracy']:.3f} "
                     f"+- {s.get('dpo_accuracy_stderr') or 0.0:.3f}")
    if s.get("win_rate_vs_previous") is not None:
        against = f"round {s['round'] - 1}" if s["round"] > 1 else "the initial policy"
        parts.append(f"win rate vs {against} {s['win_rate_vs_previous']:.2f}")
    return ", ".join(parts)


LLAMA3: list[Stage] = [
    SFT,
    reward_stage("helpful", "rm_helpfulness_hh_tiny"),
    # Llama 3 (sec. 4.1): rounds of rejection sampling -> SFT -> DPO -> model averaging; its table is the summary.
    Stage("rounds", _rounds_command, _rounds_figure, lambda stage_dir: stage_dir / "summary.md"),
]

RECIPES: dict[str, list[Stage]] = {"llama2": LLAMA2, "llama3": LLAMA3}
"""Recipe name -> its stages in order (a new recipe adds an entry)."""


def stage_overrides(sets: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    """``--set NAME:ARG`` (repeatable) -> {stage: [ARG, ...]}; an unknown stage name is a ConfigError."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for item in sets:
        name, sep, arg = item.partition(":")
        if not sep or name not in out:
            raise ConfigError(f"--set {item!r}: expected STAGE:ARG with STAGE one of {', '.join(names)}")
        out[name].append(arg)
    return out


def run_recipe(args: argparse.Namespace, *, runner: Callable[[list[str]], int] | None = None,
               print_fn: Callable[..., None] = print) -> list[tuple[str, str, str, str]]:
    """Run (or skip) every stage in order; returns the summary rows (stage, status, key figure, its summary.md
    relative to the run directory)."""
    stages = RECIPES[args.recipe]
    extra = stage_overrides(args.set, [s.name for s in stages])
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The presets' ``{data_dir}`` paths and the commands' --data paths must name the same directory.
    env = {**os.environ, "LLAMA_DATA_DIR": str(args.data)}
    runner = runner or (lambda cmd: subprocess.call(cmd, env=env))
    rows = []
    for stage in stages:
        done = run_dir / stage.name / DONE
        cmd = [sys.executable, *stage.command(args, run_dir), *extra[stage.name]]
        if done.is_file():
            status = "skipped (finished)"
        else:
            print_fn(f"[recipe] {stage.name}: {shlex.join(cmd)}", flush=True)
            code = runner(cmd)
            if code != 0:
                raise ConfigError(f"stage {stage.name} exited {code}: fix it and run the same command again "
                                  f"(finished stages are skipped); command: {shlex.join(cmd)}")
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"stage": stage.name, "command": cmd}, indent=2) + "\n")
            status = "ran"
        figure = stage.figure(run_dir)
        summary = (stage.summary or _train_report)(run_dir / stage.name)
        print_fn(f"[recipe] {stage.name} {status}: {figure} ({summary})", flush=True)
        rows.append((stage.name, status, figure, str(summary.relative_to(run_dir))))
    table = ["| stage | status | key figure | summary |", "|---|---|---|---|",
             *(f"| {n} | {s} | {f} | {m} |" for n, s, f, m in rows)]
    (run_dir / "recipe_summary.md").write_text(f"# {args.recipe} recipe: {run_dir}\n\n" + "\n".join(table) + "\n")
    print_fn("\n".join(table), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf.recipe", description=__doc__, formatter_class=FlagHelpFormatter)
    ap.add_argument("recipe", choices=sorted(RECIPES), help="which recipe")
    ap.add_argument("--pretrained", required=True, help="the pretrained model (e.g. the quickstart's runs/tiny_real)")
    ap.add_argument("--run-dir", required=True, help="one run directory per stage under it")
    ap.add_argument("--tokenizer", default=None, help="default: PRETRAINED/tokenizer/tok8192.model (the quickstart's)")
    ap.add_argument("--data", default=str(data_dir()), help="the shared data directory (HH-RLHF test files); "
                    "default $LLAMA_DATA_DIR or ../shared/data; the stages get it as LLAMA_DATA_DIR")
    ap.add_argument("--set", action="append", default=[], help="STAGE:--section.key=VALUE for one stage (repeat)")
    args = ap.parse_args(argv)
    args.tokenizer = args.tokenizer or str(Path(args.pretrained) / "tokenizer" / "tok8192.model")
    try:
        run_recipe(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
