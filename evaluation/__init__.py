"""Evaluation: lm-evaluation-harness on our own Llama (the Llama papers' benchmarks), perplexity, win rates.

    python -m evaluation run --checkpoint DIR --tokenizer TOK --tasks hellaswag,piqa --limit 100 --output out.json
    torchrun --nproc-per-node 4 -m evaluation run --tp 2 --checkpoint DIR --tasks boolq --output out.json   # TP x DP
    python -m evaluation perplexity --checkpoint DIR --tokenizer TOK --data wikitext-2-raw.test.txt

    from evaluation.adapter import LlamaLM        # the lm-eval model (TemplateLM) over our network
    from evaluation.tasks import task_manager     # the local, offline benchmark tasks

This package imports model/ and train/ (process groups) and lm-eval; nothing below it imports it.
"""

from __future__ import annotations

__all__: list[str] = []
