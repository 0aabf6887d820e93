"""Supervised fine-tuning (Llama 2 sec. 3.1): loss on the assistant's tokens only, dialogues packed per sequence.

    python -m rlhf.sft --config configs/rlhf/sft_hh_tiny.toml --sft.init_checkpoint runs/tiny_real \\
        --data.tokenizer runs/tiny_real/tokenizer/tok8192.model --run.dir runs/sft
    torchrun --standalone --nproc-per-node 2 -m rlhf.sft --config configs/rlhf/sft_llama2.toml --parallel.tp 2 ...

Data: ``[sft] files`` (dialogue JSONL, or HH-RLHF / preference files whose chosen dialogues are used), split by
the hash of the prompt (``rlhf.sources``; held-out prompts are never trained on), encoded with the chat format
(``model.chat``: loss mask on the answers and their end token), packed first-fit into rows of ``data.seq_len``
with the document mask (``rlhf.batching``). Llama 2 defaults (``configs/rlhf/sft_llama2.toml``): 2 epochs,
LR 2e-5 cosine, weight decay 0.1, batch 64 x 4096 tokens. ``train.steps = 0`` = epochs x rows / batch.

Training is ``train.loop.train`` with the language-model objective of the engine (DeepSpeed ZeRO x megatron
TP), so checkpoints, ``--resume auto``, metrics.jsonl, wandb and pre-emption are pretraining's. Outputs in
``run.dir``: ``final_model/`` (a native checkpoint + ``rlhf.json``: tokenizer and chat template),
``data_report.json`` (files, records kept/skipped, truncations, packing), ``sft_eval.json`` (held-out
assistant-token loss of the initial and of the final model).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model import comm
from model.llama import Llama, init_llama_weights
from model.materialize import build_unfilled
from rlhf.batching import pack_sft_rows, sft_example, stack_rows
from rlhf.export import export_policy
from rlhf.paths import file_list
from rlhf.sft.config import SFTConfig
from rlhf.sources import load_dialogues
from rlhf.stage import StageTask, rank, run_stage, stage_main
from train.checkpoint_files import write_json_atomic

BEFORE_FILE = "sft_eval_before.json"
"""The held-out loss of the initial weights, measured on the training engine before its first step."""


class SFTTask(StageTask):
    """Dialogue files -> packed rows (all epochs) and held-out rows; the engine's language-model objective."""

    name = "sft"
    validation_loss = "held-out answer-token loss (train.eval_batches micro-batches)"
    perplexity = True

    def build(self) -> None:
        s, seq_len = self.cfg.sft, self.cfg.data.seq_len
        splits = [load_dialogues(f, valid_fraction=s.valid_fraction, seed=s.split_seed,
                                 max_records=s.max_records_per_file) for f in file_list(s.files)]
        stats: Counter[str] = Counter()

        def encode(dialogues: Sequence[Any]) -> list[Any]:
            out = [sft_example(self.tokenizer, d, template=s.template, seq_len=seq_len, stats=stats)
                   for d in dialogues]
            return [e for e in out if e is not None]

        train_examples = encode([d for sp in splits for d in sp.train])
        train_stats = dict(stats)
        stats.clear()
        valid_examples = encode([d for sp in splits for d in sp.valid])
        pad = int(self.tokenizer.eos_id)
        rows: list[dict[str, Tensor]] = []
        pack: Counter[str] = Counter()
        for epoch in range(s.epochs):  # a fresh seeded order per epoch, then packing in that order
            order = list(range(len(train_examples)))
            random.Random(self.cfg.train.seed * 1000 + epoch).shuffle(order)
            epoch_rows, epoch_pack = pack_sft_rows([train_examples[i] for i in order], seq_len=seq_len, pad_id=pad)
            rows += epoch_rows
            pack.update(epoch_pack)
        self.train_set = rows
        self.valid_set, valid_pack = pack_sft_rows(valid_examples, seq_len=seq_len, pad_id=pad)
        fill = pack["tokens"] / max(1, pack["tokens"] + pack["padding"])
        self.report = {
            "files": [sp.describe() for sp in splits], "readers": [sp.to_dict() for sp in splits],
            "train_encoding": train_stats, "valid_encoding": dict(stats),
            "train_packing": dict(pack), "valid_packing": dict(valid_pack),
            "summary": [sp.describe() for sp in splits] + [
                f"train: {len(train_examples)} dialogues x {s.epochs} epochs -> {len(rows)} rows of {seq_len} "
                f"({100 * fill:.0f}% filled, {pack['loss_tokens']} answer tokens); truncated "
                f"{train_stats.get('truncated', 0)}, skipped (no answer within seq_len) "
                f"{train_stats.get('skipped_no_answer_tokens_within_seq_len', 0)}",
                f"held out: {len(valid_examples)} dialogues -> {len(self.valid_set)} rows"],
        }

    def collate(self, samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return stack_rows(samples)

    def before_training(self, engine: Any, run_dir: Path, *, rank: int) -> None:
        """Collective, on a fresh start: the held-out loss of the initial weights on the engine itself, kept in
        ``BEFORE_FILE`` for ``evaluate_sft`` (a resumed run reads it back)."""
        if self.valid_set:
            loss = engine_heldout_loss(engine, self.valid_set, topology=getattr(engine, "topo", None),
                                       micro_batch_size=self.cfg.train.micro_batch_size)
            if rank == 0:
                write_json_atomic(run_dir / BEFORE_FILE, {"heldout_loss_before": loss})

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        """The native checkpoint + ``rlhf.json`` (``rlhf.export``), then (held-out rows) ``evaluate_sft`` on the
        live engine: collective, like the export."""
        export_policy(engine, model_cfg, out_dir, rank=rank, meta={"stage": "sft", **self.sidecar()})
        if self.valid_set:
            self.evaluation = evaluate_sft(self.cfg, self, engine, model_cfg)


def _initial_engine_loss(task: SFTTask, engine: Any, model_cfg: Any, *, topology: Any, micro_batch_size: int) -> float:
    kwargs: dict[str, Any] = {"model_cfg": model_cfg, "engine_cfg": engine.engine_cfg, "topology": topology,
                              "objective": engine.objective, "init_weights": task.init_weights()}
    if hasattr(engine, "inference_only") and getattr(topology, "pp_size", 1) == 1:
        kwargs["inference_only"] = True  # no optimizer state: only the weights (the run's dtype)
    initial = type(engine)(**kwargs)  # released when this returns
    return engine_heldout_loss(initial, task.valid_set, topology=topology, micro_batch_size=micro_batch_size)


def initial_model(cfg: Any, task: StageTask) -> Llama:
    """The model the run started from, whole, in one process (seeded init of the same names, then the init
    checkpoint over it): the single-process reference of ``evaluate_sft``'s "before" (tests, small models)."""
    model_cfg = cfg.model_config()
    model = build_unfilled(lambda: Llama(model_cfg))  # nothing drawn: the seeded init writes every weight
    init_llama_weights(model, seed=cfg.train.seed, n_layers=model_cfg.n_layers)
    weights = task.init_weights()
    if weights is not None:
        own = model.state_dict()
        model.load_state_dict({k: weights.read(k) for k in weights.names() if k in own}, strict=False)
    return model.eval()


@torch.no_grad()
def heldout_loss(model: Llama, rows: Sequence[dict[str, Tensor]], *, batch_size: int = 8) -> dict[str, float]:
    """Mean cross-entropy over the answer tokens of packed held-out rows (document mask on), one whole model in
    one process: the reference ``evaluate_sft``'s sharded evaluation is tested against."""
    total, count = 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        b = stack_rows(rows[i : i + batch_size])
        logits = model(b["input_ids"], document_ids=b["document_ids"])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), reduction="none")
        total += float((ce * b["loss_mask"].flatten()).sum())
        count += float(b["loss_mask"].sum())
    return {"loss": total / max(count, 1.0), "tokens": count}


def engine_heldout_loss(engine: Any, rows: Sequence[dict[str, Tensor]], *, topology: Any,
                        micro_batch_size: int) -> float:
    """Collective: mean answer-token loss of ``engine`` (each rank its shard) over every held-out row once.

    Without pipeline parallelism the rows are dealt over the DP ranks; ranks with fewer rows add rows whose loss
    mask is empty (they weigh nothing), so every rank runs the same number of micro-batches (ZeRO-3 gathers per
    forward), and ``eval_loss`` sums losses and tokens over DP. A pipelined engine's ``eval_loss`` is DeepSpeed's
    mean of per-micro-batch means, so there every DP rank runs the same micro-batch, one per call, and the means
    are weighted by its answer tokens (exact; the DP ranks repeat each other's work, only for PP)."""
    dp = getattr(topology, "dp_size", 1) if topology is not None else 1
    dp_rank = getattr(topology, "dp_rank", 0) if topology is not None else 0
    empty = {k: (torch.zeros_like(v) if k == "loss_mask" else v.clone()) for k, v in rows[0].items()}

    def batches_of(part: list[dict[str, Tensor]], count: int) -> list[dict[str, Tensor]]:
        part = part + [empty] * (count * micro_batch_size - len(part))  # full micro-batches (pipeline shapes)
        return [stack_rows(part[i : i + micro_batch_size]) for i in range(0, len(part), micro_batch_size)]

    if getattr(engine, "pipelined", False):
        total, tokens = 0.0, 0.0
        for batch in batches_of(list(rows), math.ceil(len(rows) / micro_batch_size)):
            count = float(batch["loss_mask"].sum())
            if count > 0:  # the same rows on every rank: all skip together
                total += float(engine.eval_loss(iter([batch]), 1)) * count
                tokens += count
        return total / max(tokens, 1.0)
    per_rank = math.ceil(len(rows) / dp)
    num_batches = math.ceil(per_rank / micro_batch_size)
    batches = batches_of(list(rows[dp_rank::dp]), num_batches)
    return float(engine.eval_loss(iter(batches), num_batches))


def evaluate_sft(cfg: Any, task: SFTTask, engine: Any, model_cfg: Any) -> dict[str, Any]:
    """Collective (every rank, at the end of a completed run, the trained engine alive): held-out answer-token
    loss of the initial and of the trained model, each rank holding only its shard. "After" is the trained
    engine; "before" was measured on the same engine before its first step (``SFTTask.before_training``,
    ``BEFORE_FILE``), so no second model is built; only a run resumed from a checkpoint older than that file
    builds a frozen engine of the same layout from the init checkpoint (``task.init_weights``: each rank reads
    only its TP slices; ZeRO-3 partitions) or the same seeded init. Rank 0 writes ``sft_eval.json``. No rank loads
    the whole model."""
    topology = getattr(engine, "topo", None)
    mb = cfg.train.micro_batch_size
    after = engine_heldout_loss(engine, task.valid_set, topology=topology, micro_batch_size=mb)
    saved = cfg.run_dir / BEFORE_FILE  # measured before the first step (SFTTask.before_training)
    # Rank 0 decides for all (the fallback below is collective): the file as rank 0 wrote and sees it.
    before = comm.broadcast_object(json.loads(saved.read_text())["heldout_loss_before"]
                                   if rank() == 0 and saved.is_file() else None)
    if before is None:  # a run resumed from a checkpoint older than that file: a frozen engine of the initial weights
        before = _initial_engine_loss(task, engine, model_cfg, topology=topology, micro_batch_size=mb)
    tokens = float(sum(float(row["loss_mask"].sum()) for row in task.valid_set))
    result = {"heldout_loss_before": before, "heldout_loss_after": after, "heldout_answer_tokens": tokens,
              "heldout_rows": len(task.valid_set)}
    if rank() == 0:
        (cfg.run_dir / "sft_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_sft(cfg: SFTConfig, *, task: SFTTask | None = None, **loop_kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
    """Train, then (completed runs with held-out data) evaluate inside the export, on every rank; ``(RunResult,
    eval or None)`` (the evaluation on rank 0)."""
    task = task or SFTTask(cfg)
    result = run_stage(cfg, task, **loop_kwargs)
    evaluation = getattr(task, "evaluation", None) if rank() == 0 and result.reason == "completed" else None
    if evaluation is not None:
        loop_kwargs.get("print_fn", print)(
            f"[sft] held-out answer-token loss (all {evaluation['heldout_rows']} held-out rows) "
            f"{evaluation['heldout_loss_before']:.4f} -> {evaluation['heldout_loss_after']:.4f} "
            f"({int(evaluation['heldout_answer_tokens'])} tokens)")
    return result, evaluation


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, config_cls=SFTConfig, task_cls=SFTTask, run=run_sft, prog="python -m rlhf.sft", doc=__doc__,
                      example="--config configs/rlhf/sft_hh_tiny.toml --sft.init_checkpoint=runs/tiny_real --run.dir=runs/sft")
