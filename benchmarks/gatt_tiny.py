"""Experiment: Ghost Attention on a tiny Llama with an instruction it can learn; adherence before vs after.

    python benchmarks/gatt_tiny.py --work runs/gatt_tiny [--base-steps 60 --gatt-steps 150] \\
        [--output benchmarks/results/gatt_tiny.json]

Everything goes through the real command lines (``python -m rlhf.gatt train / build / eval``):

1. A "chat model" without GAtt: stories260K (a real trained tiny Llama, ../shared/data) fine-tuned with
   multi-turn SFT (``--gatt.train_turns=all``) on synthetic dialogues of questions about a small story world.
   An instruction "end every answer with the word X." (or its short form "word: X."; X in six words) is
   attached to some user messages, and an answer ends with X exactly when ITS user message carries the
   instruction. So this model follows an instruction only while it is in the current message: given it once,
   in the first message, it forgets it from turn 2 on (the behaviour GAtt fixes).
2. ``build``: for new dialogues the instruction is attached to EVERY user message, the answers are sampled
   from that model (so they comply), and the dialogues are written with the instruction in the first message only.
3. ``train``: GAtt fine-tuning from the model of step 1, loss on the last assistant turn only, random turn
   truncation.
4. ``eval``: held-out dialogues of 5 turns, the instruction in the first user message only, greedy answers;
   adherence (``ends_with:X`` checker) per turn, before and after. Output: a JSON with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QA = [
    ("where is lily?", "lily is in the park"), ("what did tim see?", "tim saw a big dog"),
    ("who is your friend?", "my friend is a little cat"), ("what is in the box?", "there is a red ball"),
    ("where did mom go?", "mom went to the store"), ("what does the bird want?", "the bird wants some food"),
    ("when do they play?", "they play after lunch"), ("what is the sun like?", "the sun is warm and bright"),
    ("who has the toy?", "the boy has the toy"), ("what did she eat?", "she ate a sweet cake"),
    ("where is the tree?", "the tree is near the house"), ("how is the dog?", "the dog is happy and fast"),
]
WORDS = ("friend", "happy", "play", "mom", "day", "time")


def instruction_forms(word: str) -> tuple[str, str]:
    return f"end every answer with the word {word}.", f"word: {word}."


def write_instructions(path: Path) -> None:
    """User-given instructions with their checker (long and short forms, as GAtt samples both)."""
    lines = []
    for w in WORDS:
        long_form, short_form = instruction_forms(w)
        for text in (long_form, short_form):
            lines.append(json.dumps({"text": text, "short": short_form, "checks": [f"ends_with:{w}"]}))
    path.write_text("\n".join(lines) + "\n")


def base_sft_dialogues(n: int, rng: random.Random, *, max_turns: int = 4) -> list[dict]:
    """Dialogues of 1..max_turns turns; an instruction on a random subset of user messages, obeyed only there."""
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        instruction = rng.choice(instruction_forms(word))
        messages = []
        for q, a in rng.sample(QA, rng.randint(1, max_turns)):
            if rng.random() < 0.5:
                messages += [{"role": "user", "content": f"{instruction} {q}"},
                             {"role": "assistant", "content": f"{a} {word}."}]
            else:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": f"{a}."}]
        out.append({"messages": messages})
    return out


def user_dialogues(n: int, turns: tuple[int, int], rng: random.Random) -> list[dict]:
    """Dialogues whose user turns GAtt build / eval use (the assistant texts are placeholders)."""
    out = []
    for _ in range(n):
        msgs = []
        for q, _ in rng.sample(QA, rng.randint(*turns)):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": "ok."}]
        out.append({"messages": msgs})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])


def run(args: argparse.Namespace) -> dict:
    data = Path(os.environ.get("LLAMA_DATA_DIR", ROOT.parent / "shared" / "data"))
    tok = data / "checkpoints" / "stories260K" / "tok512.model"
    init = data / "checkpoints" / "stories260K" / "stories260K.bin"
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write_instructions(work / "instructions.jsonl")
    _write_jsonl(work / "base_sft.jsonl", base_sft_dialogues(args.base_dialogues, rng, max_turns=args.base_turns))
    _write_jsonl(work / "gatt_users.jsonl", user_dialogues(args.gatt_dialogues, (2, args.turns), rng))
    _write_jsonl(work / "eval.jsonl", user_dialogues(args.eval_dialogues, (args.turns, args.turns), rng))
    common = ["--config", "configs/rlhf/gatt_tiny.toml", f"--data.tokenizer={tok}", "--logging.wandb=false",
              f"--data.seq_len={args.seq_len}"]
    t0 = time.perf_counter()
    _run(["rlhf.gatt", "train", *common, f"--data.path={work / 'base_sft.jsonl'}", f"--gatt.init={init}",
          "--gatt.train_turns=all", "--gatt.truncate=none", f"--train.steps={args.base_steps}",
          f"--optim.lr={args.base_lr}", f"--run.dir={work / 'base'}"], work / "base.log")
    gen = ["--tokenizer", str(tok), "--instructions", str(work / "instructions.jsonl"), "--max-new-tokens", "20"]
    _run(["rlhf.gatt", "build", "--checkpoint", str(work / "base" / "final_model"), *gen,
          "--dialogues", str(work / "gatt_users.jsonl"), "--max-turns", str(args.turns),
          "--temperature", "0",  # greedy, as the recorded results (build's default samples at 0.7)
          "--output", str(work / "gatt.jsonl")], work / "build.log")
    _run(["rlhf.gatt", "train", *common, f"--data.path={work / 'gatt.jsonl'}",
          f"--gatt.init={work / 'base' / 'final_model'}", f"--train.steps={args.gatt_steps}",
          f"--optim.lr={args.gatt_lr}",
          f"--run.dir={work / 'gatt'}"], work / "gatt.log")
    _run(["rlhf.gatt", "eval", "--checkpoint", str(work / "base" / "final_model"), "--label", "before GAtt",
          "--checkpoint", str(work / "gatt" / "final_model"), "--label", "after GAtt", *gen,
          "--dialogues", str(work / "eval.jsonl"), "--turns", str(args.turns), "--output", str(work / "eval")],
         work / "eval.log")
    result = json.loads((work / "eval" / "adherence.json").read_text())
    return {"experiment": "gatt_tiny", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores", "base_steps": args.base_steps,
            "gatt_steps": args.gatt_steps, "gatt_dialogues": args.gatt_dialogues, "turns": args.turns,
            "wall_s": time.perf_counter() - t0, "adherence": result,
            "table_md": (work / "eval" / "adherence.md").read_text()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/gatt_tiny")
    p.add_argument("--base-steps", type=int, default=60)
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--gatt-steps", type=int, default=150)
    p.add_argument("--gatt-lr", type=float, default=5e-4, help="GAtt fine-tuning LR (the recorded run: 5e-4)")
    p.add_argument("--base-dialogues", type=int, default=600)
    p.add_argument("--base-turns", type=int, default=4, help="longest baseline SFT dialogue (turns)")
    p.add_argument("--gatt-dialogues", type=int, default=300)
    p.add_argument("--eval-dialogues", type=int, default=24)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="")
    args = p.parse_args(argv)
    result = run(args)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(result["table_md"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
