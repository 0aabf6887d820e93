"""DPO (Rafailov et al. 2023) as Llama 3 runs it (Llama 3 Herd sec. 4.1.4), on the shared training loop.

    python -m rlhf.dpo --config configs/rlhf/dpo_tiny.toml --dpo.init_checkpoint runs/sft --run.dir runs/dpo
    torchrun --standalone --nproc-per-node 8 -m rlhf.dpo --config configs/rlhf/dpo_llama3_1_8b.toml \\
        --parallel.tp 8 --dpo.init_checkpoint runs/round1/sft --run.dir runs/round1/dpo

Data: ``[dpo] files``, read and split by the hash of the prompt exactly as the reward model reads them
(``rlhf.sources.load_pairs``: HH-RLHF, the graded Llama 2 format, user JSONL), encoded as prompt + answer in the
chat format (``dpo.template``; ``llama3_1`` for Llama 3.1), the oldest prompt tokens dropped when a sequence is
longer than ``data.seq_len`` (counted in ``data_report.json``).

Reference model: the init checkpoint (the round's SFT model), frozen. Its sequence log-probs of every pair are
computed once, before the first step, by the freshly built engine itself (its weights are the init checkpoint
then, under whatever TP x ZeRO layout the run uses; each DP rank scores a share, an all-gather gives everyone the
table) and saved to ``run.dir/reference_logps.safetensors``; a resumed run reads them back, so resume is exact and
no second model is ever resident next to the policy.

Training is ``train.loop.train`` with ``rlhf.dpo.model.DPOObjective`` (checkpoints, ``--run.resume``, pre-emption,
metrics.jsonl / wandb / tensorboard as pretraining). Per step it logs the loss and ``dpo/``: implicit rewards of
chosen and rejected answers, their margin, the implicit-reward accuracy, chosen/rejected log-probs and the NLL
term; ``python -m train.report RUN_DIR`` plots them. Outputs in ``run.dir``: ``final_model/`` (native checkpoint
+ ``rlhf.json``), ``data_report.json``, ``dpo_eval.json`` (held-out implicit-reward accuracy with its standard
error, mean margin; computed by the engine on every layout).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model import comm
from model.chat import encode_chat
from rlhf.batching import pad_sequences
from rlhf.dpo.config import DPOConfig
from rlhf.dpo.model import STAT_KEYS, DPOLossSettings, DPOObjective
from rlhf.losses import without_formatting_tokens
from rlhf.paths import file_list
from rlhf.sources import load_pairs
from rlhf.stage import StageTask, rank, run_stage, stage_main

SIDECAR = "rlhf.json"
REFERENCE_FILE = "reference_logps.safetensors"
FORMATTING_PIECES = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>")


# ------------------------------------------------------------------------------------------------ encoding
def encode_answer(tokenizer: Any, prompt: Sequence[dict[str, str]], answer: str, *, template: str, max_len: int,
                  stats: Counter[str]) -> tuple[list[int], list[int]]:
    """``(ids, answer_mask)`` of prompt + answer: the mask covers the last assistant turn (and its end token)."""
    enc = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}], template=template)
    last = max(enc.turn_index)
    ids, mask = enc.ids, [int(t == last) for t in enc.turn_index]
    if len(ids) > max_len + 1:  # +1: inputs and labels are the sequence shifted by one
        stats["truncated_left"] += 1
        keep = max_len
        ids, mask = ids[:1] + ids[len(ids) - keep:], mask[:1] + mask[len(mask) - keep:]
    return ids, mask


def encode_dpo_pair(tokenizer: Any, pair: Any, *, template: str, max_len: int, stats: Counter[str]) -> dict[str, Any]:
    chosen, chosen_mask = encode_answer(tokenizer, pair.prompt, pair.chosen, template=template, max_len=max_len,
                                        stats=stats)
    rejected, rejected_mask = encode_answer(tokenizer, pair.prompt, pair.rejected, template=template,
                                            max_len=max_len, stats=stats)
    return {"chosen": chosen, "chosen_mask": chosen_mask, "rejected": rejected, "rejected_mask": rejected_mask,
            "ref_logps": None}


def formatting_ids(tokenizer: Any) -> list[int]:
    """bos, eos and the Llama 3 header / end-of-turn ids the tokenizer has."""
    ids = {int(tokenizer.bos_id), int(tokenizer.eos_id)}
    for piece in FORMATTING_PIECES:
        try:
            ids.add(int(tokenizer.piece_to_id(piece)))
        except (KeyError, ValueError):
            pass
    return sorted(ids)


def collate_dpo(items: Sequence[dict[str, Any]], *, formatting: Sequence[int] = (),
                with_reference: bool = True) -> dict[str, Tensor]:
    """``B`` pairs -> rows ``0..B-1`` chosen, ``B..2B-1`` rejected, shifted (see ``rlhf.dpo.model``)."""
    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    masks = [it["chosen_mask"] for it in items] + [it["rejected_mask"] for it in items]
    ids = pad_sequences(seqs, multiple=1)
    answer = pad_sequences(masks, multiple=1).float()
    ids, labels, loss_mask = ids[:, :-1], ids[:, 1:], answer[:, 1:]
    width = -(-ids.shape[1] // 8) * 8  # a multiple of 8, as the reward model's batches
    pad = width - ids.shape[1]
    ids, labels, loss_mask = (torch.nn.functional.pad(t, (0, pad)) for t in (ids, labels, loss_mask))
    batch = {"input_ids": ids, "labels": labels, "loss_mask": loss_mask,
             "dpo_mask": without_formatting_tokens(labels, loss_mask, formatting) if formatting else loss_mask,
             "pair_weight": torch.ones(len(items))}
    if with_reference:
        if any(it["ref_logps"] is None for it in items):
            raise RuntimeError("collate_dpo: reference log-probs missing (DPOTask.attach_reference not run)")
        batch["ref_logps"] = torch.tensor([it["ref_logps"][0] for it in items] + [it["ref_logps"][1] for it in items],
                                          dtype=torch.float32)
    return batch


# ---------------------------------------------------------------------------------------------------- task
class DPOTask(StageTask):
    """Preference files -> encoded pairs (all epochs) + held-out pairs, reference log-probs, the DPO objective."""

    name = "dpo"
    topology: Any = None
    """The run's topology, set when the engine is built (``run_dpo``); the held-out evaluation scores with it."""

    def build(self) -> None:
        d, seed = self.cfg.dpo, self.cfg.train.seed
        splits = [load_pairs(f, is_safety=False, valid_fraction=d.valid_fraction, seed=d.split_seed,
                             max_records=d.max_records_per_file) for f in file_list(d.files)]
        stats: Counter[str] = Counter()
        encode = [encode_dpo_pair(self.tokenizer, p, template=d.template, max_len=self.cfg.data.seq_len, stats=stats)
                  for sp in splits for p in sp.train]
        self.pairs = encode  # unique training pairs, in file order
        self.train_set = []
        for epoch in range(d.epochs):
            order = list(range(len(encode)))
            random.Random(seed * 1000 + epoch).shuffle(order)
            self.train_set += [encode[i] for i in order]
        self.valid_set = [encode_dpo_pair(self.tokenizer, p, template=d.template, max_len=self.cfg.data.seq_len,
                                          stats=stats) for sp in splits for p in sp.valid]
        self.formatting = formatting_ids(self.tokenizer) if d.mask_formatting_tokens else []
        self.report = {"files": [sp.describe() for sp in splits], "encoding": dict(stats),
                       "formatting_ids": self.formatting,
                       "summary": [sp.describe() for sp in splits] + [
                           f"train: {len(encode)} pairs x {d.epochs} epoch(s) -> {len(self.train_set)}; held out "
                           f"{len(self.valid_set)}; truncated sequences {stats.get('truncated_left', 0)}"]}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        return collate_dpo(samples, formatting=self.formatting)

    def objective(self) -> DPOObjective:
        d = self.cfg.dpo
        return DPOObjective(DPOLossSettings(beta=d.beta, loss=d.loss, label_smoothing=d.label_smoothing,
                                            nll_weight=d.nll_weight))

    # ---- reference log-probs -----------------------------------------------------------------------
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for it in (*self.pairs, *self.valid_set):
            for key in ("chosen", "chosen_mask", "rejected", "rejected_mask"):
                h.update(torch.tensor(it[key], dtype=torch.int64).numpy().tobytes())
        h.update(json.dumps(self.formatting).encode())
        return h.hexdigest()

    def attach_reference(self, engine: Any, topology: Any) -> None:
        """Fill every pair's ``ref_logps`` from ``run.dir/reference_logps.safetensors`` when it matches the data,
        else by scoring all pairs with ``engine`` (still holding the init weights) and saving them (collective)."""
        from safetensors.torch import load_file, save_file

        items = [*self.pairs, *self.valid_set]
        path, fingerprint = self.cfg.run_dir / REFERENCE_FILE, self.fingerprint()
        table = None
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") == fingerprint:
                    table = load_file(str(path))["ref_logps"]
        if table is None:
            table = score_pairs(engine, topology, items, micro_batch_size=self.cfg.train.micro_batch_size,
                                formatting=self.formatting)
            if rank() == 0:
                tmp = path.with_suffix(".tmp")
                save_file({"ref_logps": table.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
                os.replace(tmp, path)
        for it, row in zip(items, table.tolist()):
            it["ref_logps"] = (row[0], row[1])

    def step_metrics(self, engine: Any) -> dict[str, float]:
        """The step's ``dpo/`` metrics: pair-weighted means over every DP rank's micro-batches (collective). Under
        pipeline parallelism the last stage's loss function holds them: summed over the PP group from zeros."""
        module = engine.module
        holder = module if hasattr(module, "pop_stats") else getattr(module, "loss_fn", None)
        stats = holder.pop_stats() if hasattr(holder, "pop_stats") else {}
        values = torch.tensor([stats.get(k, 0.0) for k in (*STAT_KEYS, "pairs")], dtype=torch.float64)
        topo = getattr(engine, "topo", None)
        for size, group in ((getattr(topo, "dp_size", 1), "dp_group"), (getattr(topo, "pp_size", 1), "pp_group")):
            if size > 1:
                values = values.to(topo.device)
                comm.all_reduce(values, group=getattr(topo, group))
        pairs = max(float(values[-1]), 1.0)
        return {f"dpo/{k}": float(v) / pairs for k, v in zip(STAT_KEYS, values[:-1].tolist())}

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        """Held-out implicit-reward evaluation with the trained engine, then the native checkpoint + sidecar."""
        from model.checkpoints.native import write_native
        from train.task import exported_weights

        if self.valid_set:
            evaluation = heldout_evaluation(engine, self.topology, self.valid_set, beta=self.cfg.dpo.beta,
                                            micro_batch_size=self.cfg.train.micro_batch_size,
                                            formatting=self.formatting)
            if rank == 0:
                (self.cfg.run_dir / "dpo_eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        with exported_weights(engine, out_dir) as weights:  # collective; streamed from every rank's fragments
            if weights is not None:
                write_native(weights.source(model_cfg), model_cfg, out_dir, overwrite=True)
                d = self.cfg.dpo
                (Path(out_dir) / SIDECAR).write_text(json.dumps({
                    "stage": "dpo", **self.sidecar(), "beta": d.beta, "loss": d.loss, "nll_weight": d.nll_weight,
                    "reference": d.init_checkpoint}, indent=2) + "\n")
        comm.barrier()


# ----------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_pairs(engine: Any, topology: Any, items: Sequence[dict[str, Any]], *, micro_batch_size: int,
                formatting: Sequence[int]) -> Tensor:
    """``[n, 2]`` sequence log-probs (chosen, rejected) of ``items`` under ``engine``'s current weights.

    Each DP rank scores a contiguous share, padded to the same number of forwards (ZeRO-3 gathers parameters
    collectively), then one all-gather over the DP group gives every rank the whole table."""
    dp, dp_rank = getattr(topology, "dp_size", 1), getattr(topology, "dp_rank", 0)
    share = -(-len(items) // dp)
    mine = list(items[dp_rank * share: (dp_rank + 1) * share]) or [items[0]]
    mine += [mine[-1]] * (share - len(mine))
    if getattr(topology, "pp_size", 1) > 1:  # DeepSpeed's pipeline sums its outputs: equal micro-batches
        mine += [mine[-1]] * (-len(mine) % micro_batch_size)
    chunks = [mine[i: i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    batches = [collate_dpo(chunk, formatting=formatting, with_reference=False) for chunk in chunks]
    if getattr(topology, "pp_size", 1) > 1:
        scores = engine.pipeline_forward(batches, target_keys=("labels", "loss_mask", "dpo_mask"))
    else:
        forward: Callable[..., Tensor] = engine.forward if hasattr(engine, "forward") else engine.module
        was_training = engine.module.training
        engine.module.eval()
        scores = [forward(input_ids=b["input_ids"], labels=b["labels"], loss_mask=b["loss_mask"],
                          dpo_mask=b["dpo_mask"]).float().cpu() for b in batches]
        engine.module.train(was_training)
    out = [torch.stack([logps[: len(chunk)], logps[len(chunk):]], dim=1) for chunk, logps in zip(chunks, scores)]
    local = torch.cat(out)[:share].to(getattr(topology, "device", torch.device("cpu")))
    if dp > 1:
        local = torch.cat(comm.all_gather(local, group=topology.dp_group))
    return local.cpu()[: len(items)]


def heldout_evaluation(engine: Any, topology: Any, pairs: Sequence[dict[str, Any]], *, beta: float,
                       micro_batch_size: int, formatting: Sequence[int]) -> dict[str, Any]:
    """Implicit-reward accuracy (chosen reward > rejected reward) on held-out pairs, its standard error
    ``sqrt(p (1 - p) / n)``, ties, and the mean margin ``beta * ((pc - rc) - (pr - rr))``."""
    policy = score_pairs(engine, topology, pairs, micro_batch_size=micro_batch_size, formatting=formatting)
    ref = torch.tensor([p["ref_logps"] for p in pairs], dtype=torch.float32)
    margin = beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    n = len(pairs)
    accuracy = float((margin > 0).float().mean())
    return {"heldout_pairs": n, "accuracy": accuracy, "accuracy_stderr": math.sqrt(accuracy * (1 - accuracy) / n),
            "ties": int((margin == 0).sum()), "mean_margin": float(margin.mean()),
            "mean_chosen_reward": float(beta * (policy[:, 0] - ref[:, 0]).mean()),
            "mean_rejected_reward": float(beta * (policy[:, 1] - ref[:, 1]).mean())}


# ------------------------------------------------------------------------------------------------------ CLI
def run_dpo(cfg: DPOConfig, *, task: DPOTask | None = None, **loop_kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
    """Train (reference log-probs first), evaluate on the held-out pairs; ``(RunResult, eval or None)``."""
    from train.hooks import default_engine

    task = task or DPOTask(cfg)
    base = loop_kwargs.pop("engine_factory", None) or default_engine

    def engine_with_reference(**kwargs: Any) -> Any:
        engine = base(**kwargs)
        task.topology = kwargs["topology"]
        task.attach_reference(engine, kwargs["topology"])
        return engine

    result = run_stage(cfg, task, engine_factory=engine_with_reference, **loop_kwargs)
    path = task.cfg.run_dir / "dpo_eval.json"
    evaluation = json.loads(path.read_text()) if result.reason == "completed" and path.is_file() else None
    if rank() == 0 and evaluation:
        loop_kwargs.get("print_fn", print)(
            f"[dpo] held-out implicit-reward accuracy {evaluation['accuracy']:.3f} +- "
            f"{evaluation['accuracy_stderr']:.3f} over {evaluation['heldout_pairs']} pairs, mean margin "
            f"{evaluation['mean_margin']:.4f}")
    return result, evaluation


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, config_cls=DPOConfig, task_cls=DPOTask, run=run_dpo, prog="python -m rlhf.dpo",
                      doc=__doc__, example="--config configs/rlhf/dpo_tiny.toml --dpo.init_checkpoint=runs/sft "
                                           "--run.dir=runs/dpo")
