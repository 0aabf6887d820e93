"""Win rate of a policy against a baseline on held-out prompts, judged by a reward model: ``python -m evaluation
win-rate``.

    python -m evaluation win-rate --policy runs/ppo/final_policy --baseline runs/sft/final_model \\
        --judge runs/rm_other --prompts held_out.jsonl --limit 200 --max-new-tokens 128 --output win.json

Both models answer every prompt in their chat format (``model.chat``; tokenizer and template from the
checkpoint's ``rlhf.json`` or ``--tokenizer`` / ``--template``) with the KV-cache generator (``model.generate``;
greedy by default; sampled with one seed per prompt, so an answer does not depend on the batch it ran in).
The judge scores (prompt, answer) and each prompt is a win, a tie (scores within ``--tie-margin``, or the same
answer text) or a loss for the policy. Reported: wins / ties / losses, the win rate (ties count half, as in the
Llama 2 paper's human evaluation) with a percentile-bootstrap confidence interval over prompts (seeded), the
mean score difference, and every prompt's answers and scores.

The judge must be a reward model the policy was NOT optimised against (PPO maximises its reward models'
scores, so they cannot judge it): when the policy sits in a PPO run directory (``ppo_config.toml`` beside it),
a judge that is one of that run's ``[reward]`` models is refused. The judge is any ``score(prompts, answers,
systems) -> scores`` object made by ``--judge-loader module:callable(path)``; the default names
``rlhf.reward.scorer:RewardScorer.from_checkpoint`` (a ``python -m rlhf.reward`` export) instead of importing
it, because evaluation/ sits beside rlhf/, not above it (``tests/unit/test_import_graph.py``).

Prompts: JSONL (``.gz`` too), one per line: ``{"prompt": "..."}``, ``{"messages": [{"role", "content"}...]}``
(a trailing assistant turn is dropped) or an HH-RLHF record (``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant:
..."}``: the dialogue up to its last assistant turn); an optional ``"system"``. One process, no model sharding
(for sharded policies, export them and run this on the exports). Test: ``pytest tests/unit/test_eval_win_rate.py``.
"""

from __future__ import annotations

import gzip
import importlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

DEFAULT_JUDGE_LOADER = "rlhf.reward.scorer:RewardScorer.from_checkpoint"
SIDECAR = "rlhf.json"  # an SFT/PPO export's tokenizer and chat template (written by rlhf/)


class Judge(Protocol):
    def score(self, prompts: Sequence[Sequence[dict[str, str]]], answers: Sequence[str],
              systems: Sequence[str | None] | None = None) -> Any: ...


@dataclass(frozen=True)
class Prompt:
    turns: list[dict[str, str]]
    """The dialogue so far (user last), as ``{"role", "content"}`` messages."""
    system: str | None = None


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int
    win_rate: float
    """(wins + ties / 2) / prompts."""
    ci_low: float
    ci_high: float
    confidence: float
    mean_score_difference: float
    """Mean over prompts of judge(policy answer) - judge(baseline answer)."""


def compare(policy_scores: Sequence[float], baseline_scores: Sequence[float], *, tie_margin: float = 0.0,
            same_answer: Sequence[bool] | None = None, confidence: float = 0.95, resamples: int = 2000,
            seed: int = 0) -> tuple[WinRate, list[float]]:
    """``(WinRate, per-prompt outcomes 1 / 0.5 / 0)``; the interval is a percentile bootstrap over prompts."""
    if len(policy_scores) != len(baseline_scores) or not policy_scores:
        raise ValueError(f"compare: {len(policy_scores)} policy and {len(baseline_scores)} baseline scores; "
                         "give one of each per prompt (at least one)")
    if not 0.0 < confidence < 1.0 or tie_margin < 0:
        raise ValueError(f"compare: confidence={confidence} must be in (0, 1), tie_margin={tie_margin} >= 0")
    same = list(same_answer) if same_answer is not None else [False] * len(policy_scores)
    diffs = [float(p) - float(b) for p, b in zip(policy_scores, baseline_scores, strict=True)]
    outcomes = [0.5 if s or abs(d) <= tie_margin else (1.0 if d > 0 else 0.0) for d, s in zip(diffs, same)]
    n, rng = len(outcomes), random.Random(seed)
    means = sorted(sum(outcomes[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    low, high = means[int(tail * (resamples - 1))], means[int(round((1.0 - tail) * (resamples - 1)))]
    result = WinRate(wins=outcomes.count(1.0), ties=outcomes.count(0.5), losses=outcomes.count(0.0),
                     win_rate=sum(outcomes) / n, ci_low=low, ci_high=high, confidence=confidence,
                     mean_score_difference=sum(diffs) / n)
    return result, outcomes


# ---- prompts ------------------------------------------------------------------------------------------------
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(transcript: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript up to (not including) its last assistant answer."""
    parts = _HH_TURN.split(transcript)
    turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
             for who, text in zip(parts[1::2], parts[2::2])]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns


def _prompt(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    system = record.get("system")
    if isinstance(record.get("prompt"), str):
        turns = [{"role": "user", "content": record["prompt"]}]
    elif isinstance(record.get("messages"), list):
        turns = [{"role": m["role"], "content": m["content"]} for m in record["messages"] if m.get("role") != "system"]
        system = system or next((m["content"] for m in record["messages"] if m.get("role") == "system"), None)
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
    elif isinstance(record.get("chosen"), str):
        turns = _hh_turns(record["chosen"])
    else:
        raise ValueError(f"{where}: no \"prompt\", \"messages\" or HH-RLHF \"chosen\" field")
    if not turns or turns[-1]["role"] != "user":
        raise ValueError(f"{where}: the dialogue does not end with a user turn")
    return Prompt(turns=turns, system=system)


def read_prompts(path: str | Path, *, limit: int | None = None) -> list[Prompt]:
    """The first ``limit`` prompts of a JSONL file (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    prompts: list[Prompt] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(prompts) >= limit:
                break
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON ({err})") from None
                prompts.append(_prompt(record, f"{path}:{number}"))
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts")
    return prompts


# ---- answers ------------------------------------------------------------------------------------------------
def chat_answers(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, template: str, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8) -> list[str]:
    """One answer per prompt in the chat format; long prompts keep BOS and their last tokens."""
    from model.chat import encode_chat, parse_messages
    from model.generate import generate

    max_prompt = model.config.max_seq_len - max_new_tokens
    if max_prompt < 8:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                         f"({model.config.max_seq_len} tokens)")
    ids = []
    for p in prompts:
        messages = ([{"role": "system", "content": p.system}] if p.system else []) + p.turns
        row = encode_chat(tokenizer, parse_messages(messages), template=template, add_generation_prompt=True).ids
        ids.append(row if len(row) <= max_prompt else row[:1] + row[len(row) - (max_prompt - 1):])
    vocab = tokenizer.vocab_size
    head = None
    if model.config.vocab_size > vocab:  # a padded vocabulary must never be sampled past the tokenizer's ids
        def head(hidden: torch.Tensor) -> torch.Tensor:
            logits = model.output(hidden)
            logits[..., vocab:] = float("-inf")
            return logits
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outs = generate(model, [ids[i] for i in chunk], max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, stop_ids=tokenizer.stop_ids, row_seeds=[seed * 1_000_003 + i for i in chunk],
                        logits_fn=head)
        for i, out in zip(chunk, outs):
            answers[i] = tokenizer.decode(out).strip()
    return answers


def load_chat_model(path: str | Path, *, tokenizer: str | None, template: str | None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, template)``; tokenizer and template default to the export's ``rlhf.json``."""
    from model.checkpoints import from_pretrained
    from model.tokenizer import load_tokenizer

    p = Path(path)
    if (p / "final_model").is_dir() and not (p / "config.json").is_file():
        p = p / "final_model"
    sidecar = json.loads((p / SIDECAR).read_text(encoding="utf-8")) if (p / SIDECAR).is_file() else {}
    tok = tokenizer or sidecar.get("tokenizer")
    if not tok:
        raise ValueError(f"{path}: no {SIDECAR} beside the weights (not an SFT/PPO export); pass --tokenizer")
    if not template and not sidecar.get("template"):
        raise ValueError(f"{path}: no {SIDECAR} naming its chat template; pass --template (llama2, llama3, llama3_1)")
    return from_pretrained(p).eval(), load_tokenizer(tok), template or sidecar["template"]


# ---- the judge ----------------------------------------------------------------------------------------------
def load_judge(path: str | Path, *, loader: str = DEFAULT_JUDGE_LOADER) -> Judge:
    """``loader`` (``module:callable``, attributes dotted) called with ``path``."""
    module, _, attr = loader.partition(":")
    if not module or not attr:
        raise ValueError(f"--judge-loader {loader!r}: give module:callable")
    try:
        target: Any = importlib.import_module(module)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--judge-loader {loader!r}: cannot import it ({err})") from None
    return target(path)


def _same_file(a: str | Path, b: str | Path) -> bool:
    def norm(p: Path) -> Path:
        p = p.resolve()
        return p.parent if p.name == "final_model" else p
    return norm(Path(a)) == norm(Path(b))


def check_judge_independent(policy: str | Path, judge: str | Path) -> None:
    """Refuse a judge that is one of the reward models a PPO policy was optimised against."""
    policy = Path(policy)
    for run_dir in (policy, policy.parent):
        config = run_dir / "ppo_config.toml"
        if config.is_file():
            import tomllib

            reward = tomllib.loads(config.read_text(encoding="utf-8")).get("reward", {})
            for key in ("helpful", "safety"):
                trained_on = reward.get(key) or ""
                if trained_on and ":" not in trained_on and _same_file(trained_on, judge):
                    raise ValueError(f"--judge {judge} is reward.{key} of the PPO run {run_dir} ({config}): the policy "
                                     "was optimised against it, so it cannot judge the policy; use a reward model "
                                     "trained separately (other data or seed)")


def head_to_head(policy: Any, baseline: Any, judge: Judge, prompts: Sequence[Prompt], *,
                 generation: dict[str, Any], tie_margin: float = 0.0, confidence: float = 0.95,
                 seed: int = 0, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """``policy`` / ``baseline``: ``(model, tokenizer, template)``; the result dict of ``python -m evaluation
    win-rate`` (summary, settings and every prompt's answers, scores and outcome)."""
    answers = {}
    for name, (model, tok, template) in (("policy", policy), ("baseline", baseline)):
        progress(f"{name}: answering {len(prompts)} prompts")
        answers[name] = chat_answers(model, tok, prompts, template=template, seed=seed, **generation)
    turns, systems = [p.turns for p in prompts], [p.system for p in prompts]
    progress("judging")
    scores = {name: [float(s) for s in judge.score(turns, answers[name], systems)] for name in answers}
    same = [a == b for a, b in zip(answers["policy"], answers["baseline"])]
    summary, outcomes = compare(scores["policy"], scores["baseline"], tie_margin=tie_margin, same_answer=same,
                                confidence=confidence, seed=seed)
    samples = [{"prompt": p.turns, "system": p.system, "policy": answers["policy"][i],
                "baseline": answers["baseline"][i], "policy_score": scores["policy"][i],
                "baseline_score": scores["baseline"][i], "outcome": outcomes[i]} for i, p in enumerate(prompts)]
    return {"summary": asdict(summary), "prompts": len(prompts), "tie_margin": tie_margin, "generation": generation,
            "seed": seed, "samples": samples}


# ---- command line -------------------------------------------------------------------------------------------
def _win_rate(args: Any) -> int:
    import time

    from evaluation.results import write_json

    check_judge_independent(args.policy, args.judge)  # before anything loads
    prompts = read_prompts(args.prompts, limit=args.limit)
    judge = load_judge(args.judge, loader=args.judge_loader)
    torch.manual_seed(args.seed)
    policy = load_chat_model(args.policy, tokenizer=args.tokenizer, template=args.template)
    baseline = load_chat_model(args.baseline, tokenizer=args.baseline_tokenizer or args.tokenizer,
                               template=args.baseline_template or args.template)
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                  "batch_size": args.batch_size}
    start = time.perf_counter()
    result = head_to_head(policy, baseline, judge, prompts, generation=generation, tie_margin=args.tie_margin,
                          confidence=args.confidence, seed=args.seed, progress=lambda m: print(f"[win-rate] {m}"))
    result.update(policy=str(args.policy), baseline=str(args.baseline), judge=str(args.judge),
                  prompts_file=str(args.prompts), wall_s=round(time.perf_counter() - start, 3))
    write_json(args.output, result)
    s = result["summary"]
    print(f"[win-rate] policy vs baseline on {len(prompts)} prompts: {s['wins']} wins, {s['ties']} ties, "
          f"{s['losses']} losses; win rate {s['win_rate']:.3f} ({s['confidence']:.0%} CI {s['ci_low']:.3f}-"
          f"{s['ci_high']:.3f}); wrote {args.output}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("win-rate", help="policy vs baseline on held-out prompts, judged by a reward model")
    p.add_argument("--policy", required=True, type=Path, help="the model judged (an SFT/PPO export or run dir)")
    p.add_argument("--baseline", required=True, type=Path, help="what it is compared with (e.g. the SFT model)")
    p.add_argument("--judge", required=True, type=Path, help="a reward model the policy was not trained against")
    p.add_argument("--judge-loader", default=DEFAULT_JUDGE_LOADER, help="module:callable(path) -> judge")
    p.add_argument("--prompts", required=True, type=Path, help="held-out prompts, JSONL (see the module docstring)")
    p.add_argument("--limit", type=int, help="first N prompts only")
    p.add_argument("--tokenizer", help="default: the policy's rlhf.json")
    p.add_argument("--template", help="chat template (llama2, llama3, llama3_1); default: rlhf.json")
    p.add_argument("--baseline-tokenizer", help="default: --tokenizer, else the baseline's rlhf.json")
    p.add_argument("--baseline-template", help="default: --template, else the baseline's rlhf.json")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tie-margin", type=float, default=0.0, help="score differences up to this are ties")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, type=Path)
    p.set_defaults(func=_win_rate)
