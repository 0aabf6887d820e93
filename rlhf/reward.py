"""Reward models (Llama 2 sec. 3.2.2): Llama backbone + scalar head, trained with the margin ranking loss.

    python -m rlhf.reward --config configs/rlhf/rm_helpfulness_hh_tiny.toml --rm.init_checkpoint runs/sft \\
        --data.tokenizer runs/tiny_real/tokenizer/tok8192.model --run.dir runs/rm_helpful
    torchrun --standalone --nproc-per-node 2 -m rlhf.reward --config configs/rlhf/rm_safety_llama2.toml \\
        --parallel.tp 2 ...

The model: the pretrained / SFT Llama with its language-model head removed and a linear head ``dim -> 1``
(``reward_head.weight``, seeded init) reading the final-norm hidden state at the answer's last token (its
end-of-turn token, which has attended to the whole answer). Under tensor parallelism the hidden state is whole
on every TP rank, so the head is an ordinary replicated ``nn.Linear`` and its gradient is the same on all of
them. Loss per pair: ``-log sigmoid(r_chosen - r_rejected - m(rating))`` with the margin table of
``rm.margin`` (none / small / large, ``rlhf.losses``), summed over pairs and normalised by the global
number of pairs of the step (the engine's ``weight_key``).

Data (``[rm]``): helpfulness and safety preference files split by the hash of the prompt, mixed as Llama 2
does: ``mixture = "helpfulness"``: all helpfulness pairs + an equal number sampled from safety;
``"safety"``: all safety pairs mixed 90/10 with helpfulness pairs (``rlhf.data``). Llama 2 hyperparameters
(``configs/rlhf/rm_*_llama2.toml``): 1 epoch, LR 1e-5 (5e-6 for 70B), cosine to 10%, warmup 3% of the steps
(at least 5), AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, clip 1.0, 512 pairs per batch.

Outputs in ``run.dir``: ``final_model/`` (``reward_model.safetensors`` + ``reward_model.json``: model
config, tokenizer, template, split, mixture), ``data_report.json``, ``heldout_eval.json`` (accuracy and
the length-only baseline on the held-out pairs of every file, as ``python -m rlhf.evaluate_rm`` computes it).
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.config import LlamaConfig
from model.llama import Llama
from rlhf.batching import collate_pairs, encode_answer, encode_pair, pad_sequences
from rlhf.config import RewardConfig, checkpoint_dir, file_list
from rlhf.data import PreferencePair, helpfulness_rm_mixture, safety_rm_mixture
from rlhf.losses import ranking_loss
from rlhf.sources import Split, load_pairs, unique_names
from rlhf.stage import StageTask, parse_cli, rank, run_stage, world_size

HEAD = "reward_head.weight"
FORMAT = "llama-reward-model"
WEIGHTS, META = "reward_model.safetensors", "reward_model.json"


class RewardModel(nn.Module):
    """Llama backbone without its LM head + ``reward_head``; ``forward`` gives scores or the scaled loss sum."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        model.output = None  # the LM head is not part of a reward model (and would get no gradient)
        self.model = model
        self.reward_head = nn.Linear(model.config.dim, 1, bias=False)

    def scores(self, input_ids: Tensor, score_index: Tensor) -> Tensor:
        """One scalar per row, read at ``score_index`` (fp32)."""
        hidden = self.model(input_ids, return_hidden=True)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), score_index]
        return self.reward_head(picked).squeeze(-1).float()

    def forward(self, input_ids: Tensor, score_index: Tensor, margin: Tensor | None = None,
                pair_weight: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """Rows ``0..B-1`` chosen, ``B..2B-1`` rejected (``rlhf.batching.collate_pairs``). Without ``scale``:
        the ``[2B]`` scores; with it: ``sum_i w_i * -log sigmoid(r_c - r_r - m) * scale``."""
        r = self.scores(input_ids, score_index)
        if scale is None:
            return r
        b = r.shape[0] // 2
        losses = ranking_loss(r[:b], r[b:], margin, reduction="none")
        weight = pair_weight.to(losses) if pair_weight is not None else torch.ones_like(losses)
        return (losses * weight).sum() * scale


class RewardObjective:
    """The engine objective of reward-model training (see ``train.objective.LanguageModelObjective``)."""

    input_keys: tuple[str, ...] = ("input_ids", "score_index", "margin", "pair_weight")
    weight_key: str = "pair_weight"
    supports_pipeline: bool = False  # the pipeline stages end in the LM head; TP and ZeRO 1-3 work

    def build_module(self, model_cfg: LlamaConfig, factory: Any, run_cfg: Any) -> nn.Module:
        model = Llama(model_cfg, layers=factory)
        model.checkpoint_every = run_cfg.parallel.activation_checkpoint_every
        return RewardModel(model)

    def native_name(self, name: str) -> str:
        return name.removeprefix("model.")


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
        from train.loop import barrier

        state_dict = engine.consolidated_state_dict()  # collective: every rank calls it
        if rank == 0 and state_dict:
            r = self.cfg.rm
            save_reward_model(state_dict, model_cfg, out_dir, meta={
                **self.sidecar(), "mixture": r.mixture, "margin": r.margin, "helpful_files": r.helpful_files,
                "safety_files": r.safety_files, "init_checkpoint": r.init_checkpoint})
        barrier()


# ------------------------------------------------------------------------------------------ save, load, score
def save_reward_model(state_dict: dict[str, Tensor], model_cfg: LlamaConfig, out_dir: str | Path, *,
                      meta: dict[str, Any]) -> Path:
    """``reward_model.safetensors`` (native names + ``reward_head.weight``) and ``reward_model.json``."""
    from model.checkpoints.native import atomic_directory

    if HEAD not in state_dict:
        raise ValueError(f"save_reward_model: the state dict has no {HEAD!r}; is this a reward model?")
    with atomic_directory(out_dir, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps({"format": FORMAT, "model": model_cfg.to_dict(), **meta}, indent=2) + "\n")
    return Path(out_dir)


def load_reward_model(path: str | Path) -> tuple[RewardModel, dict[str, Any]]:
    """``(RewardModel in eval mode, its reward_model.json)`` from an export (or the run dir holding it)."""
    p = checkpoint_dir(path)
    meta_path = p / META
    if not meta_path.is_file():
        raise ValueError(f"{path}: no {META}; expected a reward model exported by `python -m rlhf.reward` "
                         "(RUN_DIR/final_model or the run directory)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = RewardModel(Llama(LlamaConfig.from_dict(meta["model"])))
    weights = load_file(str(p / WEIGHTS))
    state = {(k if k == HEAD else "model." + k): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("output.weight")]
    if missing or unexpected:
        raise ValueError(f"{p / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}; the file does not match "
                         f"its {META}")
    return model.eval(), meta


class RewardScorer:
    """Scores (prompt turns, answer) with a reward model; batches sorted by length, results in input order."""

    def __init__(self, model: RewardModel, tokenizer: Any, *, template: str, max_len: int, batch_size: int = 16,
                 name: str = "rm") -> None:
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.max_len, self.batch_size, self.name = max_len, batch_size, name
        self.stats: Counter[str] = Counter()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, batch_size: int = 16, tokenizer: str | None = None) -> RewardScorer:
        from model.tokenizer import load_tokenizer

        model, meta = load_reward_model(path)
        tok = load_tokenizer(tokenizer or meta["tokenizer"])
        scorer = cls(model, tok, template=meta["template"], max_len=int(meta["max_len"]), batch_size=batch_size,
                     name=Path(path).name if Path(path).name != "final_model" else Path(path).parent.name)
        scorer.meta = meta  # type: ignore[attr-defined]
        return scorer

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[dict[str, str]]], answers: Sequence[str],
              systems: Sequence[str | None] | None = None) -> Tensor:
        encoded = [encode_answer(self.tokenizer, p, a, template=self.template, max_len=self.max_len,
                                 system=systems[i] if systems else None, stats=self.stats)
                   for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        out = torch.empty(len(encoded))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids = pad_sequences([encoded[i][0] for i in idx])
            where = torch.tensor([encoded[i][1] for i in idx])
            out[idx] = self.model.scores(ids, where)
        return out

    def score_pairs(self, pairs: Sequence[PreferencePair]) -> tuple[Tensor, Tensor]:
        prompts = [p.prompt for p in pairs]
        scores = self.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        return scores[: len(pairs)], scores[len(pairs):]


def sigmoid_scores(scores: Tensor) -> Tensor:
    """RM scores as probabilities (Llama 2 gates its combined reward on ``sigmoid``-space scores)."""
    return F.sigmoid(scores)


# ---------------------------------------------------------------------------------------------------- CLI
def evaluate_heldout(task: RewardTask) -> dict[str, Any]:
    """Accuracy, mean margin and the length baseline of the final model on every file's held-out pairs."""
    from rlhf.evaluate_rm import evaluate_pairs

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
    config, overrides = parse_cli(argv, prog="python -m rlhf.reward", doc=__doc__)
    try:  # configuration and data errors: one clear line, no traceback
        cfg = RewardConfig.from_toml(config, overrides)
        task = RewardTask(cfg)
        task.resolve(world_size=world_size())
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result, _ = run_reward(task.cfg, task=task)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
