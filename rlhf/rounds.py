"""The Llama 3 post-training loop, one command: N rounds of (optional RM retrain) -> rejection sampling -> SFT ->
DPO (one or several variants) -> averaging, each step a run directory, resumable at any step.

    python -m rlhf.rounds --config configs/rlhf/llama3_rounds_tiny.toml
    python -m rlhf.rounds --config configs/rlhf/llama3_rounds_tiny.toml --rounds.count=3   # a third round on top

Layout: ``rounds.dir/round_R/{rm,rs,sft,dpo_V,final}``. A step is finished when its ``STEP_DONE.json`` exists (written
after the step's command exited 0 and its output is in place); finished steps are never redone, an unfinished one is
run again with the same command, and the stages resume from their own checkpoints (``run.resume`` auto). Round R's
policy is round R-1's ``final`` (round 1: ``rounds.init_checkpoint``); rejection sampling picks the best of this
round's K samples and the best answers of all earlier rounds (Llama 2 / 3); ``final`` is the average of the round's
DPO variants (``rlhf.average``; one variant: its model as is). Each stage command is ``rounds.launcher`` (``python``
or e.g. ``torchrun --nproc-per-node 8``) + ``-m rlhf.<stage> --config <preset>`` + the driver's overrides + the
preset's ``rounds.<stage>_overrides``.

Per round it writes ``round_R/summary.json`` and ``rounds.dir/summary.md``: RM held-out accuracy, best-of-K gain,
DPO held-out implicit-reward accuracy (+- standard error), and the held-out win rate of this round's model against
the previous one (one sampled answer each per held-out prompt, judged by the reward model; ties count half).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.paths import resolve_path
from train.config_reader import ConfigError, RootConfig, add_config_arguments, check

DONE = "STEP_DONE.json"


@dataclass(frozen=True)
class RoundsSection:
    count: int = 2
    """Number of rounds (Llama 3: six)."""
    dir: str = "runs/llama3_rounds"
    """Root of every round's run directories."""
    init_checkpoint: str = ""
    """Round 1's policy (a pretrained or SFT model)."""
    reward_model: str = ""
    """The reward model (an ``rlhf.reward`` run dir); with ``retrain_rm`` each round trains its own from the policy."""
    retrain_rm: bool = False
    """Retrain the RM each round on ``rm_preset`` (init: the round's policy) before sampling."""
    allow_weak_rm: bool = False
    """Let rejection sampling use a reward model at or below chance / the length baseline on its held-out pairs
    (``rlhf.rejection_sampling --allow-weak-rm``; for smoke runs with a few-step RM: the gate refuses it otherwise)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files for rejection sampling (HH-RLHF, preference or dialogue JSONL)."""
    max_prompts: int = 0
    """First N prompts per file (0 = all)."""
    k: int = 4
    """Samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature (Llama 2: 1.2-1.3 is best for 10-100 samples)."""
    max_new_tokens: int = 64
    """Answer length cap while sampling."""
    sft_preset: str = "configs/rlhf/sft_hh_tiny.toml"
    """SFT preset; the driver sets sft.files, sft.init_checkpoint, run.dir."""
    dpo_preset: str = "configs/rlhf/dpo_tiny.toml"
    """DPO preset; the driver sets dpo.init_checkpoint, run.dir."""
    rm_preset: str = "configs/rlhf/rm_helpfulness_hh_tiny.toml"
    """Reward-model preset (``retrain_rm``); the driver sets rm.init_checkpoint, run.dir."""
    sft_overrides: list[str] = field(default_factory=list)
    """Extra ``--key=value`` overrides of every round's SFT."""
    dpo_overrides: list[str] = field(default_factory=list)
    """Extra overrides of every DPO variant."""
    rm_overrides: list[str] = field(default_factory=list)
    """Extra overrides of the RM retrain."""
    dpo_variants: list[str] = field(default_factory=lambda: [""])
    """One DPO run per entry, each a space-separated override list (e.g. "--dpo.beta=0.1", "--train.seed=2");
    the round's model is their average (Llama 3 averages runs of different data / hyperparameters)."""
    launcher: str = "python"
    """How stages are started: "python" or e.g. "torchrun --standalone --nproc-per-node 8"."""
    winrate_prompts: int = 32
    """Held-out prompts (per file) for the win rate against the previous round; 0 = skip."""


@dataclass(frozen=True)
class RoundsConfig(RootConfig):
    """The rounds driver's config: one ``[rounds]`` section."""

    rounds: RoundsSection = field(default_factory=RoundsSection)
    WHAT: typing.ClassVar[str] = "rounds config"
    PRESETS: typing.ClassVar[str] = "configs/rlhf/"

    def validate(self) -> RoundsConfig:
        r = self.rounds
        check(r.count >= 1, f"rounds.count={r.count}: must be >= 1", what=self.WHAT)
        check(bool(r.init_checkpoint), "rounds.init_checkpoint is empty: the round-1 policy", what=self.WHAT)
        check(bool(r.reward_model) or r.retrain_rm, "rounds.reward_model is empty and rounds.retrain_rm is false: "
              "rejection sampling needs a reward model", what=self.WHAT)
        check(bool(r.prompts), "rounds.prompts is empty: rejection sampling needs prompt files", what=self.WHAT)
        check(len(r.dpo_variants) >= 1, "rounds.dpo_variants is empty: give at least one (\"\")", what=self.WHAT)
        for name in ("sft_preset", "dpo_preset") + (("rm_preset",) if r.retrain_rm else ()):
            check(Path(getattr(r, name)).is_file(), f"rounds.{name}={getattr(r, name)!r}: file not found",
                  what=self.WHAT)
        return self


# ------------------------------------------------------------------------------------------------- steps
def step_done(run_dir: Path) -> bool:
    return (run_dir / DONE).is_file()


def run_step(name: str, command: list[str], run_dir: Path, *, expect: Path, log: Any = print) -> None:
    """Run ``command`` unless ``run_dir`` is finished; mark it finished once ``expect`` exists."""
    if step_done(run_dir):
        log(f"[rounds] {name}: finished earlier ({run_dir}), skipped")
        return
    log(f"[rounds] {name}: {shlex.join(command)}")
    code = subprocess.run(command).returncode
    if code != 0:
        raise SystemExit(f"[rounds] {name} failed with exit code {code}; fix it and rerun: finished steps are kept, "
                         f"this one resumes from its checkpoints ({run_dir})")
    if not expect.exists():
        raise SystemExit(f"[rounds] {name}: exited 0 but {expect} is missing")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DONE).write_text(json.dumps({"step": name, "command": command}, indent=2) + "\n")


class Rounds:
    """The commands of every step; ``run()`` executes the rounds in order."""

    def __init__(self, cfg: RoundsConfig, *, log: Any = print) -> None:
        self.cfg, self.r, self.root, self.log = cfg, cfg.rounds, Path(cfg.rounds.dir), log
        # the presets' ``{data_dir}/...`` prompt files, expanded once (the stages get real paths)
        self.prompts = [str(resolve_path(p)) for p in cfg.rounds.prompts]

    def stage(self, module: str, preset: str, overrides: Sequence[str]) -> list[str]:
        launcher = shlex.split(self.r.launcher)
        if launcher == ["python"]:
            launcher = [sys.executable]
        return [*launcher, "-m", module, "--config", preset, *overrides]

    def policy(self, round_no: int) -> str:
        return self.r.init_checkpoint if round_no == 1 else str(self.root / f"round_{round_no - 1}" / "final")

    def run_round(self, n: int) -> dict[str, Any]:
        r, here, policy = self.r, self.root / f"round_{n}", self.policy(n)
        rm = r.reward_model
        if r.retrain_rm:
            rm = str(here / "rm")
            run_step(f"round {n} rm", self.stage("rlhf.reward", r.rm_preset, [
                f"--rm.init_checkpoint={policy}", f"--run.dir={rm}", *r.rm_overrides]), Path(rm),
                expect=Path(rm) / "final_model", log=self.log)
        previous = [str(self.root / f"round_{i}" / "rs") for i in range(1, n)]
        rs = here / "rs"
        run_step(f"round {n} rejection sampling", [
            sys.executable, "-m", "rlhf.rejection_sampling", "--policy", policy, "--reward-model", rm,
            "--prompts", *self.prompts, "--k", str(r.k), "--temperature", str(r.temperature), "--max-new-tokens",
            str(r.max_new_tokens), "--max-prompts", str(r.max_prompts), "--round", str(n), "--seed", str(n),
            *(["--previous", *previous] if previous else []), *(["--allow-weak-rm"] if r.allow_weak_rm else []),
            "--out", str(rs)], rs, expect=rs / "best.jsonl",
            log=self.log)
        sft = here / "sft"
        run_step(f"round {n} sft", self.stage("rlhf.sft", r.sft_preset, [
            f"--sft.files={rs / 'best.jsonl'}", f"--sft.init_checkpoint={policy}", f"--run.dir={sft}",
            *r.sft_overrides]), sft, expect=sft / "final_model", log=self.log)
        dpo_dirs = []
        for v, variant in enumerate(r.dpo_variants):
            d = here / f"dpo_{v}"
            run_step(f"round {n} dpo {v}", self.stage("rlhf.dpo", r.dpo_preset, [
                f"--dpo.init_checkpoint={sft}", f"--run.dir={d}", *r.dpo_overrides, *shlex.split(variant)]), d,
                expect=d / "final_model", log=self.log)
            dpo_dirs.append(d)
        final = here / "final"
        if len(dpo_dirs) == 1:
            command = [sys.executable, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2], "
                       "dirs_exist_ok=True)", str(dpo_dirs[0] / "final_model"), str(final)]
        else:
            command = [sys.executable, "-m", "rlhf.average", *[a for d in dpo_dirs for a in ("--checkpoint", str(d))],
                       "--output", str(final), "--overwrite"]
        run_step(f"round {n} average", command, final, expect=final / "config.json", log=self.log)
        return self.summarize(n, rm=rm, dpo_dirs=dpo_dirs)

    def summarize(self, n: int, *, rm: str, dpo_dirs: list[Path]) -> dict[str, Any]:
        here = self.root / f"round_{n}"
        summary: dict[str, Any] = {"round": n}
        rm_eval = Path(rm) / "heldout_eval.json"
        if rm_eval.is_file():
            evals = json.loads(rm_eval.read_text())
            summary["rm_heldout_accuracy"] = sum(e["accuracy"] * e["pairs"] for e in evals.values()) / max(
                1, sum(e["pairs"] for e in evals.values()))
        report = json.loads((here / "rs" / "report.json").read_text())
        summary["best_of_k_gain"] = report["gain_best_of_k_over_single"]
        dpo = [json.loads((d / "dpo_eval.json").read_text()) for d in dpo_dirs if (d / "dpo_eval.json").is_file()]
        if dpo:
            summary["dpo_accuracy"] = sum(e["accuracy"] for e in dpo) / len(dpo)
            summary["dpo_accuracy_stderr"] = sum(e["accuracy_stderr"] for e in dpo) / len(dpo)  # same pairs: not pooled
        if self.r.winrate_prompts:
            from rlhf.rounds_eval import win_rate

            summary["win_rate_vs_previous"] = win_rate(
                str(here / "final"), self.policy(n), reward_model=rm, prompts=self.prompts,
                max_prompts=self.r.winrate_prompts, max_new_tokens=self.r.max_new_tokens, seed=n)
        (here / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def run(self) -> list[dict[str, Any]]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cfg.save_toml(self.root / "rounds.toml")
        summaries = []
        for n in range(1, self.r.count + 1):
            done = self.root / f"round_{n}" / "summary.json"
            summaries.append(json.loads(done.read_text()) if done.is_file() and step_done(
                self.root / f"round_{n}" / "final") else self.run_round(n))
            (self.root / "summary.md").write_text(summary_table(summaries))
            self.log(summary_table(summaries))
        return summaries


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    def f(v: Any, pct: bool = False) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"

    lines = ["| round | RM held-out acc. | best-of-K gain | DPO implicit-reward acc. | win rate vs previous |",
             "|---|---|---|---|---|"]
    for s in summaries:
        dpo = f(s.get("dpo_accuracy"), True)
        if s.get("dpo_accuracy_stderr") is not None:
            dpo += f" +- {100 * s['dpo_accuracy_stderr']:.1f}"
        lines.append(f"| {s['round']} | {f(s.get('rm_heldout_accuracy'), True)} | {f(s.get('best_of_k_gain'))} | "
                     f"{dpo} | {f(s.get('win_rate_vs_previous'), True)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.rounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RoundsConfig, prog="python -m rlhf.rounds",
                         example="--config configs/rlhf/llama3_rounds_tiny.toml")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = RoundsConfig.from_toml(args.config, overrides).validate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Rounds(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
