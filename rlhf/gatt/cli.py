"""Ghost Attention (Llama 2 sec. 3.3): build the data with the current model, fine-tune on it, measure adherence.

    python -m rlhf.gatt build --checkpoint runs/rlhf/final_policy --dialogues dialogues.jsonl \\
        --instructions builtin --output runs/gatt/gatt.jsonl          # or --instructions my_instructions.jsonl
    torchrun --standalone --nproc-per-node 2 -m rlhf.gatt train --config configs/rlhf/gatt_tiny.toml \\
        --data.path=runs/gatt/gatt.jsonl --gatt.init=runs/rlhf/final_policy --run.dir=runs/gatt/train
    python -m rlhf.gatt eval --checkpoint runs/rlhf/final_policy --label before \\
        --checkpoint runs/gatt/train/final_model --label after --tokenizer TOK --dialogues eval.jsonl \\
        --instructions builtin --turns 6 --output runs/gatt/eval       # adherence.json / .md / .png

``build`` and ``eval`` read the tokenizer and chat template from the checkpoint's ``rlhf.json`` (``--tokenizer`` /
``--template`` override them). ``build`` attaches the instruction to every user message, samples the answers with the given model, and
writes the dialogues with the instruction kept in the first user message only (``rlhf/gatt/data.py``).
``train`` is the pretraining loop (checkpoints, resume, metrics, TP x ZeRO) on those dialogues with the loss
on the last assistant turn only (``[gatt] train_turns = "last"``; ``"all"`` is multi-turn SFT). ``eval``
answers turn by turn with the instruction only in the first message and checks every answer
(``rlhf/gatt/evaluate.py``, checkers in ``rlhf/gatt/instructions.py``).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rlhf.gatt.task import GAttConfig, GAttTask
from train.config_reader import ConfigError, FlagHelpFormatter, add_config_arguments

# ----------------------------------------------------------------------------------------------- commands


def _user_turns(source: str, *, max_turns: int) -> list[list[str]]:
    """User messages of each dialogue: a JSONL of dialogues, or an HH-RLHF directory."""
    path = Path(source)
    if path.is_dir():
        from rlhf.data import read_hh_rlhf
        from rlhf.sources import hh_files

        turns = []
        for file, is_safety in hh_files(path):
            pairs, _ = read_hh_rlhf(file, is_safety=is_safety)
            turns += [[m["content"] for m in p.prompt if m["role"] == "user"] for p in pairs]
    else:
        from rlhf.data import read_dialogues_jsonl

        dialogues, report = read_dialogues_jsonl(path, require_final_assistant=False)
        print(f"dialogues {path}: {report}", file=sys.stderr)
        turns = [[m["content"] for m in d.messages if m["role"] == "user"] for d in dialogues]
    return [t[:max_turns] for t in turns if t]


def _instructions(spec: str, n: int, *, seed: int) -> list[Any]:
    from rlhf.gatt.instructions import load_instructions, sample_instruction

    rng = random.Random(seed)
    if spec == "builtin":
        return [sample_instruction(rng) for _ in range(n)]
    pool = load_instructions(spec)
    return [rng.choice(pool) for _ in range(n)]


def _from_export(args: argparse.Namespace) -> tuple[Any, str]:
    """(tokenizer, template): ``--tokenizer`` / ``--template``, else the (first) checkpoint's ``rlhf.json``, the
    self-describing export of SFT / PPO / GAtt (a run directory means its export: ``rlhf.paths.checkpoint_dir``)."""
    from model.tokenizer import load_tokenizer
    from rlhf.export import SIDECAR, read_sidecar
    from rlhf.paths import checkpoint_dir

    first = args.checkpoint[0] if isinstance(args.checkpoint, list) else args.checkpoint
    meta = read_sidecar(first)
    tok = args.tokenizer or meta.get("tokenizer")
    if not tok:
        raise ConfigError(f"--checkpoint {first}: no {SIDECAR} in {checkpoint_dir(first)} naming its tokenizer "
                          "(not an alignment-stage export); pass --tokenizer")
    if not args.tokenizer and not Path(tok).exists():
        raise ConfigError(f"{checkpoint_dir(first) / SIDECAR}: tokenizer {tok} does not exist; pass --tokenizer")
    return load_tokenizer(tok), args.template or meta.get("template", "llama2")


def _answer_fn(checkpoint: str, tokenizer: Any, args: argparse.Namespace, *, template: str) -> Any:
    from model.checkpoints import from_pretrained
    from rlhf.gatt.data import model_answer_fn
    from rlhf.paths import checkpoint_dir

    model = from_pretrained(checkpoint_dir(checkpoint))
    return model_answer_fn(model, tokenizer, template=template, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed)


def degenerate_answers(answers: list[str]) -> str:
    """Why the sampled answers are unusable ("" when they are not): most of them empty (or punctuation only,
    e.g. ".....") or one repeated string."""
    if not answers:
        return "no answers were sampled"
    empty = sum(1 for a in answers if not any(ch.isalnum() for ch in a))
    if empty > len(answers) / 2:
        return f"{empty} of {len(answers)} answers are empty or punctuation only"
    text, count = Counter(answers).most_common(1)[0]
    if count > len(answers) / 2 and len(answers) >= 4:
        return f"{count} of {len(answers)} answers are the same string {text[:40]!r}"
    return ""


def cmd_build(args: argparse.Namespace) -> int:
    from rlhf.gatt.data import build_dialogues, write_gatt_jsonl

    tok, template = _from_export(args)
    turns = _user_turns(args.dialogues, max_turns=args.max_turns)[: args.num or None]
    instructions = _instructions(args.instructions, len(turns), seed=args.seed)
    built = build_dialogues(turns, instructions, answer_fn=_answer_fn(args.checkpoint, tok, args, template=template))
    problem = degenerate_answers([m["content"] for d in built for m in d.messages if m["role"] == "assistant"])
    if problem and not args.allow_degenerate:
        raise ConfigError(f"gatt build: --checkpoint {args.checkpoint} at --temperature {args.temperature}: {problem}; "
                          "GAtt would train on them. Use a stronger model, sample (--temperature 0.7-1.0), or pass "
                          "--allow-degenerate to write them anyway")
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    write_gatt_jsonl(built, args.output)
    print(f"wrote {len(built)} GAtt dialogues to {args.output}")
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Config errors (also those the loop's validation and the task raise) print one line; anything raised by
    the training itself keeps its traceback."""
    from train.loop import train

    try:
        cfg = GAttConfig.from_toml(args.config, overrides)
        result = train(cfg, task=GAttTask(cfg.gatt))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"gatt train {result.reason} at step {result.last_step}: loss {result.last_loss:.4f}")
    return result.exit_code


def cmd_eval(args: argparse.Namespace) -> int:
    from rlhf.gatt.evaluate import evaluate_models, markdown_table, write_outputs

    labels = args.label or [Path(c).name for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        raise ValueError(f"{len(args.checkpoint)} --checkpoint but {len(labels)} --label")
    tok, template = _from_export(args)
    turns = _user_turns(args.dialogues, max_turns=args.turns)[: args.num or None]
    instructions = _instructions(args.instructions, len(turns), seed=args.seed)
    models = {label: _answer_fn(ckpt, tok, args, template=template) for label, ckpt in zip(labels, args.checkpoint)}
    result = evaluate_models(models, turns, instructions, turns=args.turns)
    write_outputs(result, args.output)
    print(markdown_table(result))
    return 0


_SUBCOMMAND_DOCS = {
    "build": "GAtt data: answer each dialogue with the instruction on every user turn, keep it in the first only.\n\n"
             "    python -m rlhf.gatt build --checkpoint runs/rlhf/final_policy --tokenizer TOK \\\n"
             "        --dialogues dialogues.jsonl --instructions builtin --output runs/gatt/gatt.jsonl",
    "eval": "Adherence per turn with the instruction in the first message only (adherence.json / .md / .png).\n\n"
            "    python -m rlhf.gatt eval --checkpoint runs/rlhf/final_policy --label before \\\n"
            "        --checkpoint runs/gatt/train/final_model --label after --tokenizer TOK --dialogues eval.jsonl \\\n"
            "        --turns 6 --output runs/gatt/eval",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf.gatt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("build", "eval"):
        s = sub.add_parser(name, formatter_class=FlagHelpFormatter, description=_SUBCOMMAND_DOCS[name])
        s.add_argument("--checkpoint", required=True, action="append" if name == "eval" else "store",
                       help="the model that answers (native export or run dir)" + (" (repeat)" if name == "eval" else ""))
        s.add_argument("--tokenizer", default=None,
                       help="the model's tokenizer.model; default: the (first) checkpoint's rlhf.json")
        s.add_argument("--dialogues", required=True, help="JSONL of dialogues (their user turns) or HH-RLHF dir")
        s.add_argument("--instructions", default="builtin", help="'builtin' (hobby/language/figure) or a JSONL")
        s.add_argument("--template", default=None,
                       help="chat format: llama2 or llama3; default: the checkpoint's rlhf.json, else llama2")
        s.add_argument("--num", type=int, default=0, help="use the first N dialogues (0 = all)")
        s.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens")
        s.add_argument("--temperature", type=float, default=0.7 if name == "build" else 0.0,
                       help="sampling temperature (0 = greedy; build samples: greedy answers of a weak model "
                            "collapse to one string)")
        s.add_argument("--seed", type=int, default=0, help="sampling / instruction-choice seed")
        s.add_argument("--output", required=True, help="output JSONL (build) or directory (eval)")
        if name == "build":
            s.add_argument("--max-turns", type=int, default=6, help="user turns per dialogue")
            s.add_argument("--allow-degenerate", action="store_true",
                           help="write the data even when most answers are empty or one repeated string")
        else:
            s.add_argument("--label", action="append", help="one name per --checkpoint (default: its directory)")
            s.add_argument("--turns", type=int, default=6, help="turns answered per dialogue")
    t = sub.add_parser("train", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="fine-tune on GAtt dialogues: the run sections ([data] path = the JSONL) + [gatt]")
    add_config_arguments(t, GAttConfig, prog="python -m rlhf.gatt train",
                         example="--config configs/rlhf/gatt_tiny.toml --data.path=runs/gatt/gatt.jsonl "
                                 "--gatt.init=runs/rlhf/final_policy --run.dir=runs/gatt/train")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.command == "train":
        return cmd_train(args, rest)
    try:
        if rest:
            raise ValueError(f"unexpected arguments {rest}")
        return cmd_build(args) if args.command == "build" else cmd_eval(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

