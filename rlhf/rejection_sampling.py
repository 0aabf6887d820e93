"""Rejection-sampling fine-tuning data (Llama 2 sec. 3.2.3): K answers per prompt, scored, the best kept.

    python -m rlhf.rejection_sampling --policy runs/sft --reward-model runs/rm_helpful \\
        [--safety-reward-model runs/rm_safety] --prompts ../shared/data/preferences/hh-rlhf/helpful-base/test.jsonl.gz \\
        --split train --k 8 --temperature 1.0 --max-new-tokens 64 --out runs/rs_round1
    # round 2: sample from the round-1 fine-tuned model, keep the best over both rounds
    python -m rlhf.rejection_sampling --policy runs/sft_rs1 ... --previous runs/rs_round1 --out runs/rs_round2
    python -m rlhf.sft --config configs/rlhf/sft_llama2.toml --sft.files runs/rs_round2/best.jsonl ...

Sampling: the policy's KV-cache generator (``model.generate``, temperature / top-p, batched prompts, seeded) with
the prompt in the policy's chat format. ``--policy`` is an export or any stage's run directory (SFT
``final_model``, PPO ``best_policy`` else ``final_policy``): its ``config.json`` gives the shape, its ``rlhf.json``
the tokenizer and template (``--tokenizer`` / ``--template`` override them). Scoring: one reward model gives its raw score; with a safety reward model as well, Llama 2's
combined score ``logit(Rs if is_safety(prompt) or Rs < 0.15 else Rh)`` on sigmoid-space scores
(``rlhf.losses.combined_reward``). Selection: per prompt, the best non-empty answer among this round's K samples
and (``--previous``) the best answers of earlier rounds, re-scored with the current reward model(s): "later
iterations pick from the best samples of all prior iterations".

Outputs in ``--out``: ``samples.jsonl`` (every sample and its scores), ``best.jsonl`` (SFT dialogues
``{"messages", "id", "score", "round"}``, ``rlhf.sft``'s input), ``report.json``: the mean over prompts of the
best-of-k score for k = 1..K (Llama 2 Fig. 7), the expected single-sample score (mean of all samples), the
first sample's score (an actual K=1 run) and the gain of best-of-K over both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.chat import encode_chat
from rlhf.batching import dialogue_messages
from rlhf.data import Dialogue, read_dialogues_jsonl
from rlhf.export import SIDECAR, read_sidecar
from rlhf.losses import combined_reward, logit
from rlhf.paths import POLICY_EXPORTS, checkpoint_dir
from rlhf.reward.gate import check_reward_model
from rlhf.reward.scorer import RewardScorer
from rlhf.sources import Prompt, load_prompts, report_dict
from train.config_reader import ConfigError, FlagHelpFormatter


class VocabMask(torch.nn.Module):
    """The output head with logits of ids the tokenizer lacks set to -inf (a model padded past its tokenizer's
    vocabulary, e.g. to a TP-divisible size, must never sample them)."""

    def __init__(self, head: torch.nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.head, self.vocab_size = head, vocab_size

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.head(hidden)
        logits[..., self.vocab_size:] = float("-inf")
        return logits


def load_policy(path: str | Path, *, tokenizer: str | None, template: str | None,
                print_fn: Any = print) -> tuple[Any, Any, str]:
    """``(model, tokenizer, template)`` from the policy's export alone: the shape from its ``config.json``, the
    tokenizer and chat template from its ``rlhf.json`` (``--tokenizer`` / ``--template`` override them). ``path``
    is an export or any stage's run directory (``rlhf.paths.checkpoint_dir``: SFT's ``final_model``, PPO's
    ``best_policy`` / ``final_policy``)."""
    from model.checkpoints import from_pretrained
    from model.tokenizer import load_tokenizer

    p = checkpoint_dir(path)
    if not p.exists():
        raise ConfigError(f"--policy {path} does not exist; pass an SFT/PPO export (RUN_DIR/final_model) or its run dir")
    if not (p / "config.json").is_file():
        raise ConfigError(f"--policy {path}: no config.json (the model shape) in {p} and no export under it "
                          f"({', '.join(POLICY_EXPORTS)}); pass a stage's run directory or its export")
    sidecar = read_sidecar(p)
    tok_path = tokenizer or sidecar.get("tokenizer")
    if not tok_path:
        raise ConfigError(f"--policy {path}: no rlhf.json beside the weights in {p} (not an rlhf stage export); "
                          "pass --tokenizer")
    if not tokenizer and not Path(tok_path).exists():
        raise ConfigError(f"{p / SIDECAR}: tokenizer {tok_path} does not exist (the export moved?); pass --tokenizer")
    model, tok = from_pretrained(p).eval(), load_tokenizer(tok_path)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"--policy {path}: the tokenizer {tok_path} has {tok.vocab_size} ids but the model "
                          f"{model.config.vocab_size} ({p / 'config.json'}); pass the tokenizer it was trained with")
    if model.config.vocab_size > tok.vocab_size:
        model.output = VocabMask(model.output, tok.vocab_size)
    chat = template or sidecar.get("template", "llama2")
    print_fn(f"[rs] policy {p} ({sidecar.get('stage', 'no rlhf.json')}): model {model.config.name} from its "
             f"config.json, tokenizer {tok_path}{'' if tokenizer else ' (rlhf.json)'}, template {chat}"
             f"{'' if template else ' (rlhf.json)' if 'template' in sidecar else ' (default)'}")
    return model, tok, chat


def prompt_ids(tok: Any, prompt: Prompt, *, template: str, max_len: int) -> list[int]:
    """The prompt in the chat format, ending where the answer starts; long prompts keep their last tokens."""
    d = Dialogue(messages=prompt.turns, system=prompt.system, date=None, source=prompt.source, id=prompt.id)
    ids = encode_chat(tok, dialogue_messages(d), template=template, add_generation_prompt=True).ids
    return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - (max_len - 1):]


def sample_answers(model: Any, tok: Any, prompts: Sequence[Prompt], *, template: str, k: int, temperature: float,
                   top_p: float, max_new_tokens: int, seed: int, batch_size: int) -> list[list[str]]:
    """``k`` answers per prompt (``[prompt][sample]``), rows grouped by prompt length, one seed per batch."""
    from model.generate import generate

    max_prompt = model.config.max_seq_len - max_new_tokens
    if max_prompt < 8:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for prompts in the policy's context "
                         f"({model.config.max_seq_len} tokens)")
    ids = [prompt_ids(tok, p, template=template, max_len=max_prompt) for p in prompts]
    rows = sorted(((i, j) for i in range(len(prompts)) for j in range(k)), key=lambda r: (len(ids[r[0]]), r))
    answers: list[list[str]] = [[""] * k for _ in prompts]
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        outs = generate(model, [ids[i] for i, _ in chunk], max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, stop_ids=tok.stop_ids, seed=seed * 100_003 + b, pad_id=0)
        for (i, j), out in zip(chunk, outs):
            answers[i][j] = tok.decode(out).strip()
    return answers


def score_answers(scorers: dict[str, Any], prompts: Sequence[Prompt], answers: Sequence[str]) -> dict[str, Tensor]:
    """Per reward model its raw scores, and ``"selection"``: the one model's score or Llama 2's combined one."""
    turns, systems = [p.turns for p in prompts], [p.system for p in prompts]
    out = {name: s.score(turns, list(answers), systems) for name, s in scorers.items()}
    if "safety" in out and "helpful" in out:
        is_safety = torch.tensor([p.is_safety for p in prompts])
        combined = combined_reward(torch.sigmoid(out["helpful"]), torch.sigmoid(out["safety"]), is_safety)
        out["selection"] = logit(combined)
    else:
        out["selection"] = next(iter(out.values()))
    return out


def best_of_k_curve(scores: Tensor) -> list[float]:
    """Mean over prompts of the max over the first k samples, k = 1..K (``scores [prompts, K]``)."""
    return [float(scores[:, :k].max(dim=1).values.mean()) for k in range(1, scores.shape[1] + 1)]


def read_previous(paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Earlier rounds' best answers by prompt id (their ``best.jsonl``; the reader reports any bad line)."""
    previous: dict[str, dict[str, Any]] = {}
    for d in paths:
        path = Path(d) / "best.jsonl"
        dialogues, report = read_dialogues_jsonl(path)
        if report.skipped:
            print(f"[rs] {path}: {report}", file=sys.stderr)
        raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rounds = {r.get("id"): int(r.get("round", 0)) for r in raw}
        for dlg in dialogues:
            previous[dlg.id] = {"answer": dlg.messages[-1]["content"], "round": rounds.get(dlg.id, 0)}
    return previous


def read_prompt_files(args: argparse.Namespace, *, split: dict[str, Any]) -> list[Prompt]:
    """The prompts of ``--prompts`` on the ``--split`` side of the reward model's hash split; with none left,
    ``OUT/data_report.json`` says what each file gave and skipped before the run stops."""
    prompts: list[Prompt] = []
    readers = []
    for path in args.prompts:
        found, report = load_prompts(path, side=args.split, valid_fraction=split["valid_fraction"], seed=split["seed"],
                                     is_safety="harmless" in path or "safety" in path)
        print(f"[rs] {path} ({args.split} side): {len(found)} prompts; reader: {report}".splitlines()[0])
        readers.append({"path": path, "side": args.split, "prompts": len(found), **report_dict(report)})
        prompts += found[: args.max_prompts] if args.max_prompts else found
    if not prompts:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_report.json").write_text(json.dumps({"readers": readers}, indent=2) + "\n")
        raise ConfigError(f"no prompts on the {args.split!r} side of {list(args.prompts)}; what each file gave and "
                          f"skipped: {out / 'data_report.json'}")
    return prompts


def run(args: argparse.Namespace) -> dict[str, Any]:
    for key, path in (("--reward-model", args.reward_model), ("--safety-reward-model", args.safety_reward_model)):
        if path and not Path(path).exists():
            raise ConfigError(f"{key} {path} does not exist: give a reward-model run directory (python -m rlhf.reward)")
        if path:
            check_reward_model(path, key=key, allow_weak=args.allow_weak_rm, flag="--allow-weak-rm")
    model, tok, template = load_policy(args.policy, tokenizer=args.tokenizer, template=args.template)
    scorers = {"helpful": RewardScorer.from_checkpoint(args.reward_model, batch_size=args.batch_size)}
    if args.safety_reward_model:
        scorers["safety"] = RewardScorer.from_checkpoint(args.safety_reward_model, batch_size=args.batch_size)
    prompts = read_prompt_files(args, split=scorers["helpful"].meta["split"])  # type: ignore[attr-defined]
    torch.manual_seed(args.seed)
    answers = sample_answers(model, tok, prompts, template=template, k=args.k, temperature=args.temperature,
                             top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                             batch_size=args.batch_size)
    flat_prompts = [p for p in prompts for _ in range(args.k)]
    scored = score_answers(scorers, flat_prompts, [a for row in answers for a in row])
    scores = scored["selection"].view(len(prompts), args.k)
    previous = read_previous(args.previous)
    carried = [p for p in prompts if p.id in previous]
    prev_scores = (score_answers(scorers, carried, [previous[p.id]["answer"] for p in carried])["selection"]
                   if carried else torch.empty(0))
    prev_by_id = {p.id: float(s) for p, s in zip(carried, prev_scores)}
    return write_outputs(args, prompts, answers, scored, scores, previous, prev_by_id)


def write_outputs(args: argparse.Namespace, prompts: Sequence[Prompt], answers: list[list[str]],
                  scored: dict[str, Tensor], scores: Tensor, previous: dict[str, dict[str, Any]],
                  prev_by_id: dict[str, float]) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    k = args.k
    n_best_empty = n_from_previous = n_no_answer = 0
    with (out / "samples.jsonl").open("w") as fs, (out / "best.jsonl").open("w") as fb:
        for i, p in enumerate(prompts):
            for j, a in enumerate(answers[i]):
                fs.write(json.dumps({"id": p.id, "round": args.round, "k": j, "answer": a, **{
                    name: float(v[i * k + j]) for name, v in scored.items()}}) + "\n")
            n_best_empty += int(answers[i][int(scores[i].argmax())] == "")
            candidates = [(float(scores[i, j]), args.round, answers[i][j]) for j in range(k) if answers[i][j]]
            if p.id in prev_by_id:
                candidates.append((prev_by_id[p.id], previous[p.id]["round"], previous[p.id]["answer"]))
            if not candidates:
                n_no_answer += 1  # every sample empty and nothing from earlier rounds: no SFT example
                continue
            score, rnd, answer = max(candidates, key=lambda c: (c[0], c[1]))
            n_from_previous += int(rnd != args.round)
            messages = ([{"role": "system", "content": p.system}] if p.system else []) + [
                *p.turns, {"role": "assistant", "content": answer}]
            fb.write(json.dumps({"messages": messages, "id": p.id, "score": score, "round": rnd}) + "\n")
    curve = best_of_k_curve(scores)
    single = float(scores.mean())
    report = {
        "prompts": len(prompts), "k": k, "temperature": args.temperature, "top_p": args.top_p, "split": args.split,
        "round": args.round, "reward_models": [args.reward_model] + ([args.safety_reward_model]
                                                                      if args.safety_reward_model else []),
        "mean_best_of_k": curve[-1], "mean_single_sample": single, "mean_first_sample": curve[0],
        "median_sample": float(statistics.median(scores.flatten().tolist())),
        "gain_best_of_k_over_single": curve[-1] - single, "gain_best_of_k_over_first": curve[-1] - curve[0],
        "best_of_k_curve": curve, "empty_samples": sum(a == "" for row in answers for a in row),
        "best_sample_empty": n_best_empty, "prompts_without_answer": n_no_answer,
        "best_from_previous_rounds": n_from_previous, "previous_rounds": list(args.previous),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rlhf.rejection_sampling", description=__doc__,
                                 formatter_class=FlagHelpFormatter)
    ap.add_argument("--policy", required=True, help="the model to sample from (SFT run dir or checkpoint)")
    ap.add_argument("--reward-model", required=True, help="(helpfulness) reward model run dir or final_model")
    ap.add_argument("--safety-reward-model", default="", help="optional safety RM: Llama 2's combined score")
    ap.add_argument("--prompts", nargs="+", required=True, help="prompt files: HH-RLHF, preference or dialogue JSONL")
    ap.add_argument("--split", choices=("train", "valid", "all"), default="train",
                    help="side of the reward model's hash split to take prompts from (valid = held out)")
    ap.add_argument("--max-prompts", type=int, default=0, help="first N prompts per file (0 = all)")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=1.0, help="Llama 2: 1.2-1.3 is best for 10-100 samples")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 = off)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per generation / scoring batch")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--round", type=int, default=1, help="this round's number (recorded with each answer)")
    ap.add_argument("--previous", nargs="*", default=[], help="earlier rounds' --out directories")
    ap.add_argument("--tokenizer", default=None, help="default: the policy's rlhf.json")
    ap.add_argument("--template", default=None, help="default: the policy's rlhf.json, else llama2")
    ap.add_argument("--allow-weak-rm", action="store_true",
                    help="use a reward model whose held-out accuracy is at or below chance or the length baseline")
    ap.add_argument("--out", required=True, help="output directory (samples.jsonl, best.jsonl, report.json)")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error(f"--k {args.k}: need at least one sample per prompt")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    curve = ", ".join(f"{v:.3f}" for v in report["best_of_k_curve"])
    print(f"[rs] {report['prompts']} prompts x {report['k']} samples at T={report['temperature']}: mean best-of-"
          f"{report['k']} {report['mean_best_of_k']:.3f} vs single sample {report['mean_single_sample']:.3f} (gain "
          f"{report['gain_best_of_k_over_single']:+.3f}; first sample {report['mean_first_sample']:.3f}); best-of-k "
          f"for k=1..{report['k']}: {curve}; wrote {args.out}/best.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
