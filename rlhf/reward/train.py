"""Reward models (Llama 2 sec. 3.2.2): Llama backbone + scalar head, trained with the margin ranking loss.

    python -m rlhf.reward --config configs/rlhf/rm_helpfulness_hh_tiny.toml --rm.init_checkpoint runs/sft \\
        --data.tokenizer runs/tiny_real/tokenizer/tok8192.model --run.dir runs/rm_helpful
    torchrun --standalone --nproc-per-node 2 -m rlhf.reward --config configs/rlhf/rm_safety_llama2.toml \\
        --parallel.tp 2 ...

The model (``rlhf.reward.model``): the pretrained / SFT Llama with its language-model head removed and a linear
head ``dim -> 1`` (``reward_head.weight``, seeded init) at the answer's last token. Loss per pair: ``-log sigmoid(r_chosen - r_rejected - m(rating))`` with the margin table of
``rm.margin`` (none / small / large, ``rlhf.losses``), summed over pairs and normalised by the global
number of pairs of the step (the engine's ``weight_key``).

Data (``[rm]``): helpfulness and safety preference files split by the hash of the prompt, mixed as Llama 2
does: ``mixture = "helpfulness"``: all helpfulness pairs + an equal number sampled from safety;
``"safety"``: all safety pairs mixed 90/10 with helpfulness pairs (``rlhf.data``). Llama 2 hyperparameters
(``configs/rlhf/rm_*_llama2.toml``): 1 epoch, LR 1e-5 (5e-6 for 70B), cosine to 10%, warmup 3% of the steps
(at least 5), AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, clip 1.0, 512 pairs per batch.

Outputs in ``run.dir``: ``final_model/`` (``reward_model.safetensors`` + ``reward_model.json``: model
config, tokenizer, template, split, mixture), ``data_report.json``, ``heldout_eval.json`` (accuracy and
the length-only baseline on the held-out pairs of every file, as ``python -m rlhf.evaluate_rm`` computes it:
``rlhf.reward.evaluate``).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from model import comm
from rlhf.batching import collate_pairs, encode_pair
from rlhf.data import PreferencePair, helpfulness_rm_mixture, safety_rm_mixture
from rlhf.paths import file_list
from rlhf.reward.config import RewardConfig
from rlhf.reward.evaluate import evaluate_pairs
from rlhf.reward.model import RewardObjective
from rlhf.reward.scorer import RewardScorer
from rlhf.scalar_head import write_scalar_model
from rlhf.sources import Split, load_pairs, unique_names
from rlhf.stage import StageTask, rank, run_stage, stage_main


# ------------------------------------------------------------------------------------------------- the task
def mix_pairs(helpful: Sequence[PreferencePair], safety: Sequence[PreferencePair], *, mixture: str, seed: int,
              safety_fraction: float) -> tuple[list[PreferencePair], dict[str, int]]:
    """The Llama 2 mixture of ``rm.mixture`` (``"all"``: both pools, shuffled)."""
    if mixture == "helpfulness":
        return helpfulness_rm_mixture(helpful, safety, seed=seed)
    if mixture == "safety":
        return safety_rm_mixture(safety, helpful, seed=seed, safety_fraction=safety_fraction)
    if mixture == "all":
        mix = [*helpful, *safety]
        random.Random(seed).shuffle(mix)
        return mix, {"helpful": len(helpful), "safety": len(safety), "total": len(mix)}
    raise ValueError(f"rm.mixture={mixture!r}: use \"helpfulness\", \"safety\" or \"all\"")


class RewardTask(StageTask):
    """Preference files -> the configured mixture of encoded pairs (all epochs) and held-out pairs."""

    name = "rm"
    validation_loss = "held-out ranking loss"
    perplexity = False  # exp(ranking loss) is not a perplexity

    def splits(self) -> tuple[list[Split[PreferencePair]], list[Split[PreferencePair]]]:
        r = self.cfg.rm
        common = {"valid_fraction": r.valid_fraction, "seed": r.split_seed, "max_records": r.max_records_per_file}
        return ([load_pairs(f, is_safety=False, **common) for f in file_list(r.helpful_files)],
                [load_pairs(f, is_safety=True, **common) for f in file_list(r.safety_files)])

    def build(self) -> None:
        r, seed = self.cfg.rm, self.cfg.train.seed
        helpful, safety = self.splits()
        every = (*helpful, *safety)
        self.heldout = {name: sp.valid for name, sp in zip(unique_names([sp.path for sp in every]), every)}
        mix = {side: mix_pairs([p for sp in helpful for p in getattr(sp, side)],
                               [p for sp in safety for p in getattr(sp, side)], mixture=r.mixture, seed=seed,
                               safety_fraction=r.safety_fraction) for side in ("train", "valid")}
        stats: Counter[str] = Counter()
        encode = {}
        for pair in (*mix["train"][0], *mix["valid"][0]):
            if id(pair) not in encode:
                encode[id(pair)] = encode_pair(self.tokenizer, pair, template=r.template,
                                               max_len=self.cfg.data.seq_len, margin_table=r.margin, stats=stats)
        train_pairs = mix["train"][0]
        self.train_set = []
        for epoch in range(r.epochs):  # epoch 0 in the mixture's order, later epochs reshuffled
            order = list(range(len(train_pairs)))
            if epoch:
                random.Random(seed * 1000 + epoch).shuffle(order)
            self.train_set += [encode[id(train_pairs[i])] for i in order]
        self.valid_set = [encode[id(p)] for p in mix["valid"][0]]
        self.report = {
            "files": [sp.describe() for sp in (*helpful, *safety)], "mixture": r.mixture,
            "readers": [sp.to_dict() for sp in (*helpful, *safety)],
            "train_mixture": mix["train"][1], "valid_mixture": mix["valid"][1], "margin": r.margin,
            "encoding": dict(stats), "ratings": dict(Counter(str(p.rating) for p in train_pairs)),
            "summary": [sp.describe() for sp in (*helpful, *safety)] + [
                f"{r.mixture} mixture: train {mix['train'][1]}, held out {mix['valid'][1]}; {r.epochs} epoch(s) -> "
                f"{len(self.train_set)} pairs; margin {r.margin}; truncated sequences {stats.get('truncated_left', 0)}"],
        }

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        return collate_pairs(samples)

    def objective(self) -> RewardObjective:
        return RewardObjective()

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        from train.task import exported_weights

        with exported_weights(engine, out_dir) as weights:  # collective; streamed from every rank's fragments
            if weights is not None:
                r = self.cfg.rm
                write_scalar_model(weights, model_cfg, out_dir, meta={
                    **self.sidecar(), "mixture": r.mixture, "margin": r.margin, "helpful_files": r.helpful_files,
                    "safety_files": r.safety_files, "init_checkpoint": r.init_checkpoint})
        comm.barrier()


# ---------------------------------------------------------------------------------------------------- CLI
def evaluate_heldout(task: RewardTask) -> dict[str, Any]:
    """Accuracy, mean margin and the length baseline of the final model on every file's held-out pairs."""
    scorer = RewardScorer.from_checkpoint(task.cfg.run_dir / "final_model")
    result = {name: evaluate_pairs(scorer, pairs) for name, pairs in task.heldout.items() if pairs}
    (task.cfg.run_dir / "heldout_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_reward(cfg: RewardConfig, *, task: RewardTask | None = None, **loop_kwargs: Any) -> tuple[Any, Any]:
    """Train, then (rank 0, completed runs) evaluate on the held-out pairs; ``(RunResult, eval or None)``."""
    task = task or RewardTask(cfg)
    result = run_stage(cfg, task, **loop_kwargs)
    evaluation = None
    if rank() == 0 and result.reason == "completed":
        evaluation = evaluate_heldout(task)
        for name, e in evaluation.items():
            loop_kwargs.get("print_fn", print)(
                f"[rm] held out {name}: accuracy {e['accuracy']:.3f} over {e['pairs']} pairs (length baseline "
                f"{e['length_baseline']:.3f}), mean margin {e['mean_margin']:.3f}")
    return result, evaluation


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, config_cls=RewardConfig, task_cls=RewardTask, run=run_reward, prog="python -m rlhf.reward", doc=__doc__,
                      example="--config configs/rlhf/rm_helpfulness_hh_tiny.toml --rm.init_checkpoint=runs/sft --run.dir=runs/rm_helpful")
