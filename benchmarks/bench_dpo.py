"""Benchmark: one DPO training step of ours vs TRL's ``DPOTrainer`` on the same model and batch, one process, fp32.

    python benchmarks/bench_dpo.py [--output benchmarks/results/bench_dpo.json] [--repeats 5] [--pairs 8]

The model: a Hugging Face ``LlamaForCausalLM`` (``debug_15m``'s shape: dim 384, 6 layers, 6 heads, 2 kv heads,
vocab 8192; seeded HF init), saved with ``save_pretrained``; TRL trains that HF model, ours reads the same
directory through our HF converter (``model.checkpoints.open_checkpoint``), so both hold identical weights.
The batch: ``--pairs`` preference pairs of seeded random tokens (prompt 64-160 tokens, answers 32-96), the same
pairs every step for both (TRL's dataset holds exactly those pairs, tokenized already: ``_prepare_dataset`` is
bypassed so that both see the very same ids and completion masks). Loss: sigmoid DPO, beta 0.1, no NLL term,
no formatting mask (TRL has neither); reference log-probs precomputed once by each side before step 1
(``precompute_ref_log_probs=True`` in TRL, ``rlhf.dpo.train.score_pairs`` in ours), so a step is the policy
forward + backward + clip + AdamW on both sides.

- ours: ``train.engine.TrainEngine.train_step`` with ``rlhf.dpo.model.DPOObjective`` (DeepSpeed ZeRO-1 in one
  process, fused CPU kernels, the batch from ``rlhf.dpo.train.collate_dpo``);
- TRL: ``DPOTrainer.training_step`` (its collator's batch, its ``_compute_loss`` forward and the Trainer's
  backward), then ``clip_grad_norm_`` and the trainer's own optimizer (``create_optimizer``: AdamW as
  ``args.optim`` says), as ``Trainer``'s inner loop does.

Before any timing the two losses must agree on every step (same weights, batch and AdamW settings: they differ
only by fp32 rounding; exit 1 and nothing written otherwise). Timed steps alternate ours / TRL after
``--warmup`` untimed steps of each; medians are reported with the ratio ours / TRL (goal <= 0.8) and the load
average, because on a shared machine it says how far to trust the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

BETA, LR, CLIP = 0.1, 1e-4, 1.0
# fp32 on both sides, the same math in another order (fused kernels vs HF eager): step-1 losses agree to ~1e-7;
# the updates carry the rounding forward. A wrong mask, shift or reference moves the loss by >= 1e-3.
LOSS_TOLERANCE = 1e-4


def make_pairs(vocab: int, n: int, *, seed: int) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> list[int]:
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return torch.randint(3, vocab, (length,), generator=gen).tolist()

    return [{"prompt_ids": draw(64, 160), "chosen_ids": draw(32, 96), "rejected_ids": draw(32, 96)} for _ in range(n)]


def save_hf_model(model_name: str, out: Path, *, seed: int) -> Any:
    import transformers

    from model.checkpoints.hf import hf_config_from_llama
    from model.config import get_config

    cfg = get_config(model_name)
    hf_cfg = transformers.LlamaConfig(**hf_config_from_llama(cfg))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.save_pretrained(out)
    return cfg


class Ours:
    """Our DPO step: the engine with the DPO objective, weights read from the HF directory by our converter."""

    def __init__(self, hf_dir: Path, model_cfg: Any, pairs: list[dict[str, list[int]]]) -> None:
        from model.checkpoints import open_checkpoint
        from rlhf.dpo.config import DPOConfig
        from rlhf.dpo.model import DPOLossSettings, DPOObjective
        from rlhf.dpo.train import collate_dpo, score_pairs
        from train.engine import TrainEngine
        from train.topology import Topology

        n = len(pairs)
        run = DPOConfig.from_toml(None, [f"--model.name={model_cfg.name}", f"--train.global_batch_size={n}",
                                         f"--train.micro_batch_size={n}", "--zero.stage=1", "--optim.weight_decay=0",
                                         f"--optim.grad_clip={CLIP}", "--optim.beta1=0.9", "--optim.beta2=0.999",
                                         "--optim.eps=1e-8", "--train.dtype=fp32", "--logging.wandb=false"])
        self.topology = Topology.initialize(tp=1, pp=1)
        self.engine = TrainEngine(model_cfg=model_cfg, engine_cfg=run.engine_config(), topology=self.topology,
                                  objective=DPOObjective(DPOLossSettings(beta=BETA)),
                                  init_weights=open_checkpoint(hf_dir))
        self.items = [{"chosen": p["prompt_ids"] + p["chosen_ids"], "rejected": p["prompt_ids"] + p["rejected_ids"],
                       "chosen_mask": [0] * len(p["prompt_ids"]) + [1] * len(p["chosen_ids"]),
                       "rejected_mask": [0] * len(p["prompt_ids"]) + [1] * len(p["rejected_ids"]),
                       "ref_logps": None} for p in pairs]
        table = score_pairs(self.engine, self.topology, self.items, micro_batch_size=n, formatting=())
        for it, row in zip(self.items, table.tolist()):
            it["ref_logps"] = (row[0], row[1])
        self.ref_logps = table
        self.collate = collate_dpo

    def step(self) -> float:
        batch = self.collate(self.items)  # collation is part of the step on both sides
        return float(self.engine.train_step(iter([batch]), LR).loss)


class TRL:
    """TRL's DPO step on the HF model (see the module docstring)."""

    def __init__(self, hf_dir: Path, model_cfg: Any, pairs: list[dict[str, list[int]]], work: Path) -> None:
        import datasets
        import transformers
        from trl import DPOConfig, DPOTrainer

        class PreTokenized(DPOTrainer):  # the pairs are already token ids: keep them exactly as they are
            def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                return dataset

        self.model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        tokenizer = _hf_tokenizer(model_cfg.vocab_size)
        n = len(pairs)
        args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
                         learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=CLIP, beta=BETA,
                         loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None, report_to=[],
                         use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
                         precompute_ref_batch_size=n, save_strategy="no", logging_strategy="no")
        self.trainer = PreTokenized(model=self.model, args=args, processing_class=tokenizer,
                                    train_dataset=datasets.Dataset.from_list(pairs))
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we drive ourselves
        self.rows = [self.trainer.train_dataset[i] for i in range(n)]
        self.ref_logps = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in self.rows])
        self.model.train()

    def step(self) -> float:
        inputs = self.trainer.data_collator(self.rows)
        loss = self.trainer.training_step(self.model, inputs)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _hf_tokenizer(vocab: int) -> Any:
    """A word-level HF tokenizer over ``vocab`` ids: TRL reads only its pad / eos ids (the data is ids already)."""
    import tokenizers
    import transformers

    words = {f"t{i}": i for i in range(vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t0"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2", bos_token="t1",
                                                unk_token="t0")


def main(argv: list[str] | None = None) -> int:  # long: build, check, time, write
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_dpo.json"))
    ap.add_argument("--model", default="debug_15m")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model_cfg = save_hf_model(args.model, hf_dir, seed=0)
        pairs = make_pairs(model_cfg.vocab_size, args.pairs, seed=1)
        ours, trl = Ours(hf_dir, model_cfg, pairs), TRL(hf_dir, model_cfg, pairs, Path(tmp))
        ref_gap = float((ours.ref_logps - trl.ref_logps).abs().max())
        contenders = {"ours": ours, "trl": trl}
        times: dict[str, list[float]] = {k: [] for k in contenders}
        losses: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(args.warmup + args.repeats):
            for name, c in contenders.items():
                t0 = time.perf_counter()
                losses[name].append(c.step())
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    gaps = [abs(a - b) for a, b in zip(losses["ours"], losses["trl"])]
    print(f"losses ours {losses['ours']}\nlosses trl  {losses['trl']}\nreference log-prob gap {ref_gap:.3g}")
    if not all(g <= LOSS_TOLERANCE for g in gaps) or ref_gap > 1e-3:
        print(f"bench_dpo: losses differ by up to {max(gaps):.3g} (tolerance {LOSS_TOLERANCE}), reference log-probs "
              f"by {ref_gap:.3g}: not the same model, batch or loss; no timing written", file=sys.stderr)
        return 1
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    from train.metrics import cpu_name

    result = {
        "benchmark": "bench_dpo", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(), "gpu": None,
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
        "model": args.model, "params": sum(p.numel() for p in trl.model.parameters()),
        "pairs": args.pairs, "tokens_per_step": tokens, "dtype": "fp32", "beta": BETA, "lr": LR,
        "warmup_steps": args.warmup, "timed_steps": args.repeats,
        "losses": losses, "max_loss_gap": max(gaps), "reference_logp_gap": ref_gap,
        "step_s_median": med, "step_s_samples": times, "ratio_ours_over_trl": med["ours"] / med["trl"],
        "goal": "ours / TRL <= 0.8", "goal_met": med["ours"] / med["trl"] <= 0.8,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ours {med['ours']:.3f} s/step, TRL {med['trl']:.3f} s/step, ratio {result['ratio_ours_over_trl']:.3f}; "
          f"max loss gap {max(gaps):.2e}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
