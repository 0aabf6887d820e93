"""Reward-model evaluation: accuracy per test set and per rating bucket, mean margin, the length baseline, a
score histogram (Llama 2 Tables 7-8).

    python -m rlhf.evaluate_rm --checkpoint runs/rm_helpful runs/rm_safety \\
        --data ../shared/data/preferences/hh-rlhf/helpful-base/test.jsonl.gz \\
               ../shared/data/preferences/hh-rlhf/harmless-base/test.jsonl.gz --out runs/eval_rm

Every checkpoint is scored on every file: with two reward models and two test sets this is Llama 2's 2x2
table. ``--split valid`` (default) evaluates only the pairs the reward models held out (the hash split
recorded in their ``reward_model.json``); ``all`` uses every pair of the files (for test sets that were never
trained on). A pair counts as correct when ``r(chosen) > r(rejected)`` (a tie counts half). The length-only
baseline predicts "the longer answer (in characters) is chosen" (ties half): a reward model that has learned
nothing but length gets exactly that. Writes ``OUT/eval_rm.json``, ``OUT/summary.md`` and ``OUT/scores_<rm>.png`` (chosen vs
rejected score histograms per test set) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhf.data import PreferencePair, rating_buckets
from rlhf.reward.scorer import RewardScorer
from rlhf.sources import load_pairs, read_pairs, unique_names
from train.config_reader import FlagHelpFormatter


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Share of pairs with ``chosen > rejected``; ties count half."""
    if chosen.numel() == 0:
        return float("nan")
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


def length_baseline(pairs: Sequence[PreferencePair]) -> float:
    """Accuracy of "the longer answer is chosen" (characters; ties count half)."""
    if not pairs:
        return float("nan")
    chosen = torch.tensor([float(len(p.chosen)) for p in pairs])
    rejected = torch.tensor([float(len(p.rejected)) for p in pairs])
    return pair_accuracy(chosen, rejected)


def summarize(pairs: Sequence[PreferencePair], chosen: Tensor, rejected: Tensor) -> dict[str, Any]:
    """Accuracy, mean margin ``r_c - r_r``, length baseline, and the same per rating bucket."""
    per_rating = {}
    for rating, idx in rating_buckets(pairs).items():
        sel = torch.tensor(idx, dtype=torch.long)
        per_rating[rating] = {"pairs": len(idx), "accuracy": pair_accuracy(chosen[sel], rejected[sel]),
                              "mean_margin": float((chosen[sel] - rejected[sel]).mean()),
                              "length_baseline": length_baseline([pairs[i] for i in idx])}
    return {"pairs": len(pairs), "accuracy": pair_accuracy(chosen, rejected),
            "mean_margin": float((chosen - rejected).mean()) if len(pairs) else float("nan"),
            "length_baseline": length_baseline(pairs), "per_rating": per_rating,
            "mean_chosen_score": float(chosen.mean()) if len(pairs) else float("nan"),
            "mean_rejected_score": float(rejected.mean()) if len(pairs) else float("nan")}


def evaluate_pairs(scorer: Any, pairs: Sequence[PreferencePair], *, keep_scores: bool = False) -> dict[str, Any]:
    """``summarize`` of one reward model on one list of pairs (``keep_scores`` adds the raw scores)."""
    chosen, rejected = scorer.score_pairs(pairs)
    out = summarize(pairs, chosen, rejected)
    if keep_scores:
        out["scores"] = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
    return out


def load_test_sets(specs: Sequence[str], *, side: str, split: dict[str, Any] | None,
                   max_pairs: int = 0) -> tuple[dict[str, list[PreferencePair]], dict[str, str]]:
    """``NAME=PATH`` or ``PATH`` -> {name: pairs of ``side``}, {name: reader report}."""
    paths = [s.split("=", 1)[1] if "=" in s else s for s in specs]
    names = [s.split("=", 1)[0] if "=" in s else n for s, n in zip(specs, unique_names(paths))]
    sets, reports = {}, {}
    for name, path in zip(names, paths):
        is_safety = any(w in name.lower() or w in path.lower() for w in ("harmless", "safety"))
        if side == "all":
            pairs, report, _ = read_pairs(path, is_safety=is_safety)
            pairs = pairs[:max_pairs] if max_pairs else pairs
        else:
            assert split is not None
            sp = load_pairs(path, is_safety=is_safety, valid_fraction=split["valid_fraction"], seed=split["seed"])
            pairs, report = (sp.valid if side == "valid" else sp.train), sp.report
            pairs = pairs[:max_pairs] if max_pairs else pairs
        sets[name], reports[name] = pairs, str(report)
    return sets, reports


def histogram(path: Path, title: str, results: dict[str, dict[str, Any]]) -> None:
    """Chosen vs rejected score histograms, one panel per test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        for key, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
            ax.hist(r["scores"][key], bins=40, alpha=0.55, color=color, label=key)
        ax.set_title(f"{name}: acc {r['accuracy']:.3f}, margin {r['mean_margin']:.2f}")
        ax.set_xlabel("reward score")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    sets = list(result["length_baseline"])
    width = max(26, *(len(n) + 2 for n in result["models"]))
    lines = [f"{'accuracy (' + result['split'] + ')':<{width}}" + "".join(f"{s:>16}" for s in sets)]
    for name, per_set in result["models"].items():
        lines.append(f"{name:<{width}}" + "".join(f"{per_set[s]['accuracy']:>16.3f}" for s in sets))
    lines.append(f"{'length baseline (longer)':<{width}}" + "".join(f"{result['length_baseline'][s]:>16.3f}"
                                                                  for s in sets))
    lines.append(f"{'pairs':<{width}}" + "".join(f"{result['pairs'][s]:>16d}" for s in sets))
    for name, per_set in result["models"].items():
        lines.append(f"{name} mean margin: " + ", ".join(f"{s} {per_set[s]['mean_margin']:.3f}" for s in sets))
        for s in sets:
            buckets = per_set[s]["per_rating"]
            if len(buckets) > 1 or "unrated" not in buckets:
                lines.append(f"  {s} by rating: " + ", ".join(
                    f"{k} {v['accuracy']:.3f} (n={v['pairs']}, margin {v['mean_margin']:.2f})"
                    for k, v in buckets.items()))
    return "\n".join(lines)


def evaluate(checkpoints: Sequence[str], data: Sequence[str], *, side: str = "valid", out_dir: Path | None = None,
             batch_size: int = 16, max_pairs: int = 0) -> dict[str, Any]:
    """Score every checkpoint on every test set (see the module docstring); writes JSON + PNGs to ``out_dir``."""
    scorers = [RewardScorer.from_checkpoint(c, batch_size=batch_size) for c in checkpoints]
    split = None
    if side != "all":
        splits = {json.dumps(s.meta["split"], sort_keys=True) for s in scorers}  # type: ignore[attr-defined]
        if len(splits) > 1:
            raise ValueError(f"--split {side}: the checkpoints were trained with different splits {sorted(splits)}; "
                             "evaluate them separately or use --split all on data none of them saw")
        split = scorers[0].meta["split"]  # type: ignore[attr-defined]
    sets, reports = load_test_sets(data, side=side, split=split, max_pairs=max_pairs)
    names = unique_names(checkpoints) if len({s.name for s in scorers}) < len(scorers) else [s.name for s in scorers]
    result: dict[str, Any] = {"split": side, "split_settings": split, "data": dict(zip(sets, data)),
                              "reader_reports": reports, "checkpoints": dict(zip(names, checkpoints)),
                              "pairs": {n: len(p) for n, p in sets.items()},
                              "length_baseline": {n: length_baseline(p) for n, p in sets.items()}, "models": {}}
    for name, scorer in zip(names, scorers):
        per_set = {n: evaluate_pairs(scorer, p, keep_scores=True) for n, p in sets.items() if p}
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            histogram(out_dir / f"scores_{name}.png", f"reward model {name}", per_set)
        for r in per_set.values():
            r.pop("scores")
        per_set["truncated_sequences"] = scorer.stats.get("truncated_left", 0)  # type: ignore[assignment]
        result["models"][name] = per_set
    if out_dir is not None:
        (out_dir / "eval_rm.json").write_text(json.dumps(result, indent=2) + "\n")
        write_summary(out_dir, result)
    return result


def write_summary(out_dir: Path, result: dict[str, Any]) -> Path:
    """``OUT/summary.md``: the table of ``format_table``, the checkpoints, test files and plots."""
    lines = [f"# reward-model evaluation ({result['split']} side)", "", "```", format_table(result), "```", "",
             *(f"- {name}: `{path}`" for name, path in result["checkpoints"].items()),
             *(f"- test set {name}: `{path}`" for name, path in result["data"].items()), "",
             "Plots: " + ", ".join(f"scores_{name}.png" for name in result["models"])]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.evaluate_rm", description=__doc__,
                                     formatter_class=FlagHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="reward model run dirs or final_model dirs")
    parser.add_argument("--data", nargs="+", required=True, help="preference files (PATH or NAME=PATH)")
    parser.add_argument("--split", choices=("valid", "train", "all"), default="valid",
                        help="which side of the reward models' hash split to evaluate (valid = held out)")
    parser.add_argument("--out", default="eval_rm", help="output directory (eval_rm.json, scores_*.png)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs scored per forward")
    parser.add_argument("--max-pairs", type=int, default=0, help="first N pairs per test set (0 = all)")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.data, side=args.split, out_dir=Path(args.out),
                          batch_size=args.batch_size, max_pairs=args.max_pairs)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"wrote {Path(args.out) / 'eval_rm.json'}")
    return 0

