"""Ghost Attention (Llama 2 sec. 3.3): build the data with the current model, fine-tune on it, measure adherence.

    python -m rlhf.gatt build --checkpoint runs/rlhf/final_policy --tokenizer TOK --dialogues dialogues.jsonl \\
        --instructions builtin --output runs/gatt/gatt.jsonl          # or --instructions my_instructions.jsonl
    torchrun --standalone --nproc-per-node 2 -m rlhf.gatt train --config configs/rlhf/gatt_tiny.toml \\
        --data.path=runs/gatt/gatt.jsonl --gatt.init=runs/rlhf/final_policy --run.dir=runs/gatt/train
    python -m rlhf.gatt eval --checkpoint runs/rlhf/final_policy --label before \\
        --checkpoint runs/gatt/train/final_model --label after --tokenizer TOK --dialogues eval.jsonl \\
        --instructions builtin --turns 6 --output runs/gatt/eval       # adherence.json / .md / .png

``build`` attaches the instruction to every user message, samples the answers with the given model, and
writes the dialogues with the instruction kept in the first user message only (``rlhf/gatt_data.py``).
``train`` is the pretraining loop (checkpoints, resume, metrics, TP x ZeRO) on those dialogues with the loss
on the last assistant turn only (``[gatt] train_turns = "last"``; ``"all"`` is multi-turn SFT). ``eval``
answers turn by turn with the instruction only in the first message and checks every answer
(``rlhf/gatt_eval.py``, checkers in ``rlhf/instructions.py``).
"""

from __future__ import annotations

import argparse
import random
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.loop import PretrainTask

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class GAttSection:
    init: str = ""
    """Checkpoint the fine-tuning starts from (the current RLHF model); "" = the run's seeded init."""
    template: str = "llama2"
    """Chat format: "llama2" or "llama3"."""
    train_turns: str = "last"
    """"last": loss on the last assistant turn only (GAtt); "all": every assistant turn (plain SFT)."""
    truncate: str = "random"
    """"random": cut each dialogue after a random number of turns (every depth trained); "none"."""
    valid_fraction: float = 0.05
    """Share of the dialogues held out for the validation loss."""


class GAttTask(PretrainTask):
    """``train.loop`` task: chat-encoded dialogues of ``[data] path`` with the GAtt loss mask."""

    name = "gatt"

    def __init__(self, section: GAttSection) -> None:
        self.section = section

    def build_datasets(self, cfg: Any, model_cfg: Any, *, dp_size: int, run_dir: Path) -> tuple[Any, Any, int]:
        from model.tokenizer import load_tokenizer
        from rlhf.gatt_data import ExampleDataset, read_gatt_jsonl, training_examples

        if not cfg.data.tokenizer:
            raise ValueError("gatt train: set data.tokenizer (the model's tokenizer.model)")
        tok = load_tokenizer(cfg.data.tokenizer)
        dialogues = read_gatt_jsonl(cfg.data.path)
        rng = random.Random(cfg.train.seed)
        valid_mask = [rng.random() < self.section.valid_fraction for _ in dialogues]
        s, t = self.section, cfg.train
        common = {"tokenizer": tok, "template": s.template, "train_turns": s.train_turns, "truncate": s.truncate}
        train_ex, report = training_examples([d for d, v in zip(dialogues, valid_mask) if not v], seed=t.seed,
                                             **common)
        valid_ex, _ = training_examples([d for d, v in zip(dialogues, valid_mask) if v], seed=t.seed + 1, **common)
        n_valid = t.eval_batches * t.micro_batch_size * dp_size if t.eval_every > 0 and valid_ex else 0
        train_ds = ExampleDataset(train_ex, seq_len=cfg.data.seq_len, num_samples=t.steps * t.global_batch_size,
                                  seed=t.seed, pad_id=tok.pad_id)
        valid_ds = ExampleDataset(valid_ex, seq_len=cfg.data.seq_len, num_samples=n_valid, seed=t.seed + 1,
                                  pad_id=tok.pad_id) if n_valid else None
        print(f"gatt data {cfg.data.path}: {dict(report)}; {len(train_ds.examples)} train / "
              f"{len(valid_ex)} valid examples; {train_ds.dropped} longer than data.seq_len dropped", flush=True)
        return train_ds, valid_ds, -1  # no EOD splitting: every turn attends to the first user message

    def loader(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
               consumed_samples: int, eod: int) -> Any:
        from rlhf.gatt_data import TrimmedLoader

        return TrimmedLoader(dataset, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                              dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples, eod_id=eod)

    def engine_kwargs(self, cfg: Any, model_cfg: Any) -> dict[str, Any]:
        if not self.section.init:
            return {}
        from model.checkpoints import load_checkpoint

        ckpt_cfg, weights = load_checkpoint(self.section.init)
        if (ckpt_cfg.dim, ckpt_cfg.n_layers, ckpt_cfg.vocab_size) != (model_cfg.dim, model_cfg.n_layers,
                                                                      model_cfg.vocab_size):
            raise ValueError(f"gatt.init={self.section.init!r} has dim {ckpt_cfg.dim}, {ckpt_cfg.n_layers} layers, "
                             f"vocab {ckpt_cfg.vocab_size}; the run's model {model_cfg.name!r} differs: set "
                             "[model] / [model.overrides] to the checkpoint's shape")
        return {"init_weights": weights}


    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        """The native checkpoint of the fine-tuned model (a tied head, listed once by the engine, re-added)."""
        from model.checkpoints.native import save_native
        from train.loop import barrier

        state_dict = engine.consolidated_state_dict()  # collective: every rank calls it
        if rank == 0 and state_dict:
            if model_cfg.tie_embeddings and "output.weight" not in state_dict:
                state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
            save_native(state_dict, model_cfg, out_dir, overwrite=True)
        barrier()


def load_train_config(path: str | None, overrides: list[str]) -> tuple[Any, GAttSection]:
    """(RunConfig, GAttSection) from a TOML holding the run config's tables plus ``[gatt]``, then
    ``--section.key=value`` overrides (``--gatt.key=value`` for the GAtt table)."""
    from train.config import RunConfig, coerce, parse_overrides

    data = tomllib.loads(Path(path).read_text()) if path else {}
    gatt_table = dict(data.pop("gatt", {}))
    for key, value in parse_overrides(overrides):
        parts = key.split(".")
        if parts[0] == "gatt":
            gatt_table[parts[1]] = value
        elif parts[:2] == ["model", "overrides"] and len(parts) == 3:
            data.setdefault("model", {}).setdefault("overrides", {})[parts[2]] = value
        else:
            data.setdefault(parts[0], {})[".".join(parts[1:])] = value
    hints = typing.get_type_hints(GAttSection)
    bad = sorted(set(gatt_table) - set(hints))
    if bad:
        raise ValueError(f"unknown [gatt] key(s) {bad}; valid keys: {sorted(hints)}")
    section = GAttSection(**{k: coerce(v, hints[k], where=f"gatt.{k}") for k, v in gatt_table.items()})
    return RunConfig.from_dict(data, source=f"{path or '<defaults>'} + overrides"), section


# ----------------------------------------------------------------------------------------------- commands


def _user_turns(source: str, *, max_turns: int) -> list[list[str]]:
    """User messages of each dialogue: a JSONL of dialogues, or an HH-RLHF directory."""
    path = Path(source)
    if path.is_dir():
        from rlhf.data import read_hh_rlhf
        from rlhf.ppo_data import _hh_files

        turns = []
        for file, is_safety in _hh_files(path):
            pairs, _ = read_hh_rlhf(file, is_safety=is_safety)
            turns += [[m["content"] for m in p.prompt if m["role"] == "user"] for p in pairs]
    else:
        from rlhf.data import read_dialogues_jsonl

        dialogues, report = read_dialogues_jsonl(path, require_final_assistant=False)
        print(f"dialogues {path}: {report}", file=sys.stderr)
        turns = [[m["content"] for m in d.messages if m["role"] == "user"] for d in dialogues]
    return [t[:max_turns] for t in turns if t]


def _instructions(spec: str, n: int, *, seed: int) -> list[Any]:
    from rlhf.instructions import load_instructions, sample_instruction

    rng = random.Random(seed)
    if spec == "builtin":
        return [sample_instruction(rng) for _ in range(n)]
    pool = load_instructions(spec)
    return [rng.choice(pool) for _ in range(n)]


def _answer_fn(checkpoint: str, tokenizer: Any, args: argparse.Namespace) -> Any:
    from model.checkpoints import from_pretrained
    from rlhf.gatt_data import model_answer_fn

    model = from_pretrained(checkpoint)
    return model_answer_fn(model, tokenizer, template=args.template, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed)


def cmd_build(args: argparse.Namespace) -> int:
    from model.tokenizer import load_tokenizer
    from rlhf.gatt_data import build_dialogues, write_gatt_jsonl

    tok = load_tokenizer(args.tokenizer)
    turns = _user_turns(args.dialogues, max_turns=args.max_turns)[: args.num or None]
    instructions = _instructions(args.instructions, len(turns), seed=args.seed)
    built = build_dialogues(turns, instructions, answer_fn=_answer_fn(args.checkpoint, tok, args))
    write_gatt_jsonl(built, args.output)
    print(f"wrote {len(built)} GAtt dialogues to {args.output}")
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from train.loop import train

    cfg, section = load_train_config(args.config, overrides)
    result = train(cfg, task=GAttTask(section))
    print(f"gatt train {result.reason} at step {result.last_step}: loss {result.last_loss:.4f}")
    return result.exit_code


def cmd_eval(args: argparse.Namespace) -> int:
    from model.tokenizer import load_tokenizer
    from rlhf.gatt_eval import evaluate_models, markdown_table, write_outputs

    labels = args.label or [Path(c).name for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        raise ValueError(f"{len(args.checkpoint)} --checkpoint but {len(labels)} --label")
    tok = load_tokenizer(args.tokenizer)
    turns = _user_turns(args.dialogues, max_turns=args.turns)[: args.num or None]
    instructions = _instructions(args.instructions, len(turns), seed=args.seed)
    models = {label: _answer_fn(ckpt, tok, args) for label, ckpt in zip(labels, args.checkpoint)}
    result = evaluate_models(models, turns, instructions, turns=args.turns)
    write_outputs(result, args.output)
    print(markdown_table(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf.gatt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("build", "eval"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", required=True, action="append" if name == "eval" else "store")
        s.add_argument("--tokenizer", required=True)
        s.add_argument("--dialogues", required=True, help="JSONL of dialogues (their user turns) or HH-RLHF dir")
        s.add_argument("--instructions", default="builtin", help="'builtin' (hobby/language/figure) or a JSONL")
        s.add_argument("--template", default="llama2")
        s.add_argument("--num", type=int, default=0, help="use the first N dialogues (0 = all)")
        s.add_argument("--max-new-tokens", type=int, default=64)
        s.add_argument("--temperature", type=float, default=0.0)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--output", required=True)
        if name == "build":
            s.add_argument("--max-turns", type=int, default=6)
        else:
            s.add_argument("--label", action="append")
            s.add_argument("--turns", type=int, default=6)
    t = sub.add_parser("train")
    t.add_argument("--config", default=None, help="TOML: run config tables + [gatt] (configs/rlhf/gatt*.toml)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, rest)
        if rest:
            raise ValueError(f"unexpected arguments {rest}")
        return cmd_build(args) if args.command == "build" else cmd_eval(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
