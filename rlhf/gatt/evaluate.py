"""Ghost Attention evaluation: instruction adherence at turns 1..N, the instruction only in the first user message.

    python -m rlhf.gatt eval --checkpoint runs/base/final_model --checkpoint runs/gatt/final_model \\
        --label before --label after --tokenizer TOK --dialogues synthetic|FILE --turns 6 --output runs/gatt_eval

For every dialogue (user turns + an instruction) each model answers turn by turn (greedy, KV-cache generator),
seeing its own earlier answers and the instruction in the first user message only; an answer adheres when all
of the instruction's programmatic checks pass (``rlhf/gatt/instructions.py``). Output: ``adherence.json``
(per model, per turn: adherent / total and the rate), ``adherence.md`` (the table) and ``adherence.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf.gatt.data import Messages, sample_answers
from rlhf.gatt.instructions import Instruction


def adherence_by_turn(answers: Sequence[Sequence[str]], instructions: Sequence[Instruction],
                      *, turns: int) -> list[dict[str, float]]:
    """``[{"turn": t, "adherent": a, "total": n, "rate": a / n}]`` for t = 1..turns."""
    table = []
    for t in range(turns):
        checked = [inst.adheres(a[t]) for a, inst in zip(answers, instructions) if t < len(a)]
        table.append({"turn": t + 1, "adherent": sum(checked), "total": len(checked),
                      "rate": sum(checked) / len(checked) if checked else float("nan")})
    return table


def evaluate_models(models: dict[str, Callable[[list[Messages]], list[str]]], user_turns: Sequence[Sequence[str]],
                    instructions: Sequence[Instruction], *, turns: int) -> dict[str, Any]:
    """Adherence tables of several models (label -> answer_fn) on the same dialogues, plus examples."""
    out: dict[str, Any] = {"turns": turns, "dialogues": len(user_turns), "models": {}}
    for label, answer_fn in models.items():
        answers = sample_answers(user_turns, instructions, answer_fn=answer_fn, every_turn=False)
        out["models"][label] = {"adherence": adherence_by_turn(answers, instructions, turns=turns),
                                "example": {"instruction": instructions[0].text, "user": list(user_turns[0]),
                                            "answers": answers[0]}}
    return out


def markdown_table(result: dict[str, Any]) -> str:
    labels = list(result["models"])
    lines = ["| turn | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for t in range(result["turns"]):
        cells = []
        for label in labels:
            row = result["models"][label]["adherence"][t]
            cells.append(f"{100 * row['rate']:.0f}% ({row['adherent']}/{row['total']})")
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> Path:
    """adherence.json, adherence.md and adherence.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adherence.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "adherence.md").write_text(markdown_table(result))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, data in result["models"].items():
        rows = data["adherence"]
        ax.plot([r["turn"] for r in rows], [100 * r["rate"] for r in rows], marker="o", label=label)
    ax.set_xlabel("dialogue turn")
    ax.set_ylabel("instruction adherence (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Ghost Attention: instruction in the first user message only")
    fig.tight_layout()
    fig.savefig(out / "adherence.png", dpi=100)
    plt.close(fig)
    return out
