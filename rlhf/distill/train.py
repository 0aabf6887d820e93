"""Logit distillation (Hinton et al. 2015; GKD's divergences): a student learns a frozen teacher's next-token
distribution, optionally mixed with the hard labels.

    python -m rlhf.distill --config configs/rlhf/distill_tiny.toml --distill.teacher runs/teacher/final_model
    torchrun --standalone --nproc-per-node 2 -m rlhf.distill --config ... --distill.teacher_tp 2   # TP2 teacher,
                                                                                # TP1 x DP2 student
    python -m rlhf.distill --config ... --distill.precompute_to runs/teacher_logits    # offline: top-k to disk
    python -m rlhf.distill --config ... --distill.teacher_logits runs/teacher_logits  # then train from them

Per token with loss mask m (pretraining: all tokens; dialogues: the answers only):

    loss = (1 - w) * T^2 * D(teacher_T || student_T)  +  w * CE(student, next token),   w = hard_label_weight

with D = forward KL, reverse KL or generalised JSD over the teacher's top-k (``rlhf/distill/losses.py``; k = 0 is
the whole vocabulary). The student trains under the engine like pretraining (any TP x PP x ZeRO layout it runs;
checkpoints, resume, metrics are the loop's); the teacher runs beside it in inference only, at
``distill.teacher_tp`` (``rlhf/distill/teacher.py``), or its top-k logits are read from disk
(``rlhf/distill/offline.py``). The batch carries the teacher's ``[b, s, k]`` values and ids to the student's
objective (under PP to the last stage's loss, as targets beside the labels). Outputs in ``run.dir``:
``final_model/`` and ``distill_eval.json`` (held-out teacher KL, student loss, argmax agreement with the teacher).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.llama import Llama
from rlhf.distill.config import DistillConfig
from rlhf.distill.losses import argmax_agreement, distill_token_loss
from rlhf.sft.train import SFTTask
from rlhf.stage import rank, run_stage, stage_main

TEACHER_KEYS = ("teacher_values", "teacher_indices")


def distill_loss_sum(logits: Tensor, labels: Tensor, loss_mask: Tensor, teacher_values: Tensor,
                     teacher_indices: Tensor, *, section: Any, tp_size: int) -> Tensor:
    """``sum_t m_t [(1 - w) T^2 D_t + w CE_t]`` over one micro-batch from the student's (vocab-parallel at TP > 1)
    logits. Shared by the plain module and the last pipeline stage, so both layouts compute the same arithmetic."""
    from train.objective import masked_loss_sum

    s = section
    group, tp_rank = None, 0
    if tp_size > 1:
        from megatron.core import parallel_state

        group, tp_rank = parallel_state.get_tensor_model_parallel_group(), \
            parallel_state.get_tensor_model_parallel_rank()
    total = torch.zeros((), device=logits.device)
    if s.hard_label_weight < 1.0:
        kd = distill_token_loss(logits, teacher_values, teacher_indices, kind=s.loss, temperature=s.temperature,
                                beta=s.beta, group=group, tp_size=tp_size, tp_rank=tp_rank)
        total = total + (1.0 - s.hard_label_weight) * (kd * loss_mask.float()).sum()
    if s.hard_label_weight > 0.0:
        total = total + s.hard_label_weight * masked_loss_sum(logits, labels, loss_mask, tp_size=tp_size)
    return total


class DistillLoss(nn.Module):
    """Student forward + ``(1 - w) T^2 D + w CE`` per token, masked, summed, scaled (the engine's module contract)."""

    def __init__(self, model: Llama, *, section: Any, tp_size: int, document_mask: bool = True) -> None:
        super().__init__()
        self.model, self.section, self.tp_size, self.document_mask = model, section, tp_size, document_mask

    def forward(self, input_ids: Tensor, labels: Tensor, loss_mask: Tensor, document_ids: Tensor,
                teacher_values: Tensor, teacher_indices: Tensor, scale: Tensor) -> Tensor:
        logits = self.model(input_ids, document_ids=document_ids if self.document_mask else None)
        return distill_loss_sum(logits, labels, loss_mask, teacher_values, teacher_indices, section=self.section,
                                tp_size=self.tp_size) * scale


class DistillPipelineLoss:
    """The last pipeline stage's loss (DeepSpeed's ``loss_fn``): ``(logits, (labels, loss_mask, teacher_values,
    teacher_indices, scale))`` -> the scaled loss sum. The teacher's top-k travel as loss targets: DeepSpeed's pipe
    engine hands the data iterator's second tuple to the last stage as it is (no inter-stage transfer)."""

    def __init__(self, *, section: Any, tp_size: int) -> None:
        self.section, self.tp_size = section, tp_size

    def __call__(self, logits: Tensor, targets: tuple[Tensor, ...]) -> Tensor:
        labels, loss_mask, teacher_values, teacher_indices, scale = targets
        return distill_loss_sum(logits, labels, loss_mask, teacher_values, teacher_indices, section=self.section,
                                tp_size=self.tp_size) * scale


class DistillObjective:
    """The engine objective: the language-model batch plus the teacher's top-k; under pipeline parallelism the
    top-k ride with the labels to the last stage (``pipeline_target_keys``)."""

    input_keys = ("input_ids", "labels", "loss_mask", "document_ids", *TEACHER_KEYS)
    weight_key = "loss_mask"
    supports_pipeline = True
    supports_sequence_parallel = True  # both losses (DistillPipelineLoss too) read the SP head's gathered logits
    sequence_keys = input_keys  # padding: loss_mask 0 (the teacher's [b, s, k] top-k padded along s too)
    pipeline_target_keys = ("labels", "loss_mask", *TEACHER_KEYS)
    """What the last pipeline stage's loss receives besides the logits (``train.engine``: then ``scale``)."""

    def __init__(self, section: Any, *, document_mask: bool = True) -> None:
        self.section, self.document_mask = section, document_mask

    def wrap(self, model: Llama, *, layers: Any) -> nn.Module:
        return DistillLoss(model, section=self.section, tp_size=layers.tp_size, document_mask=self.document_mask)

    def pipeline_loss(self, *, tp_size: int) -> DistillPipelineLoss:
        return DistillPipelineLoss(section=self.section, tp_size=tp_size)

    def native_name(self, name: str) -> str:
        return name.removeprefix("model.")


class IndexedSamples:
    """A dataset whose samples carry their own index (the key of the offline teacher logits)."""

    def __init__(self, dataset: Any, *, eod: int) -> None:
        self.dataset, self.eod = dataset, eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        from data_pipeline.loader import document_ids

        sample = dict(self.dataset[i])
        if "tokens" in sample:  # pretraining shards / synthetic documents
            tokens = sample.pop("tokens").long()
            sample.update(input_ids=tokens, document_ids=document_ids(tokens, self.eod),
                          labels=sample["labels"].long(), loss_mask=sample["loss_mask"].float())
        return {**sample, "sample_index": torch.tensor(i)}


class WithTeacher:
    """Micro-batches of ``loader`` with the teacher's top-k added (online teacher or offline store)."""

    def __init__(self, loader: Any, *, teacher: Any, store: Any, k: int) -> None:
        self.loader, self.teacher, self.store, self.k = loader, teacher, store, k

    @property
    def consumed_samples(self) -> int:
        return self.loader.consumed_samples

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for batch in self.loader:
            if self.store is not None:
                values, indices = self.store.read(batch["sample_index"].tolist())
                values = values.float()
            else:
                values, indices = self.teacher.topk(batch["input_ids"], batch["document_ids"], k=self.k)
            yield {**batch, "teacher_values": values, "teacher_indices": indices}


class DistillTask(SFTTask):
    """Pretraining shards or SFT dialogues, with the teacher's top-k in every micro-batch."""

    name = "distill"

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.tokenizer = None
        if cfg.data.tokenizer:
            from model.tokenizer import load_tokenizer
            from rlhf.paths import resolve_path

            self.tokenizer = load_tokenizer(resolve_path(cfg.data.tokenizer))
        self.train_set, self.valid_set, self.report, self._built = [], [], {}, False
        self.eod, self._teacher = -1, None

    def build(self) -> None:
        if self.cfg.distill.data == "sft":
            super().build()
            self.eod = int(self.tokenizer.eos_id)
            return
        from train.data import build_datasets

        cfg = self.cfg
        train_ds, valid_ds, self.eod = build_datasets(cfg, cfg.model_config(), dp_size=1, run_dir=cfg.run_dir)
        self.train_set = IndexedSamples(train_ds, eod=self.eod)
        self.valid_set = IndexedSamples(valid_ds, eod=self.eod) if valid_ds is not None else []
        self.report = {"summary": [f"pretraining data: {len(self.train_set)} training sequences of "
                                   f"{cfg.data.seq_len}, {len(self.valid_set)} held out"]}

    def before_training(self, engine: Any, run_dir: Path, *, rank: int) -> None:
        """Nothing: ``SFTTask``'s held-out loss of the initial model is ``evaluate_sft``'s, which distillation does
        not run (its held-out figures are ``evaluate_distill``'s); its rows may be pretraining sequences too."""

    def check_vocab(self, model_cfg: Any) -> None:
        if self.tokenizer is not None:
            super().check_vocab(model_cfg)

    def collate(self, samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def build_datasets(self, cfg: Any, model_cfg: Any, *, dp_size: int, run_dir: Path) -> tuple[Any, Any, int]:
        if not self._built:
            self.build()
            self._built = True
        valid = self.valid_set if (len(self.valid_set) and cfg.train.eval_every) else None
        return self.train_set, valid, self.eod

    def teacher(self) -> Any:
        """The online teacher (built once, collectively), or None in offline mode."""
        d = self.cfg.distill
        if self._teacher is None and not d.teacher_logits:
            from rlhf.distill.teacher import Teacher
            from rlhf.paths import checkpoint_dir, resolve_path

            dtype = torch.bfloat16 if d.teacher_dtype == "bf16" else torch.float32
            self._teacher = Teacher.load(checkpoint_dir(resolve_path(d.teacher)), tp_size=d.teacher_tp, dtype=dtype)
        return self._teacher

    def loader(self, dataset: Any, **kwargs: Any) -> WithTeacher:
        d = self.cfg.distill
        store = None
        if d.teacher_logits:
            from rlhf.distill.offline import TeacherLogits
            from rlhf.distill.precompute import VALID
            from rlhf.paths import resolve_path

            root = resolve_path(d.teacher_logits)
            store = TeacherLogits(root if dataset is self.train_set else root / VALID)
        return WithTeacher(super().loader(dataset, **kwargs), teacher=self.teacher(), store=store,
                           k=self.cfg.vocab_k)

    def objective(self) -> DistillObjective:
        return DistillObjective(self.cfg.distill, document_mask=self.cfg.data.document_mask)

    def export(self, engine: Any, model_cfg: Any, out_dir: Path, *, rank: int) -> None:
        from train.task import export_final

        export_final(engine, model_cfg, out_dir, rank=rank)


@torch.no_grad()
def evaluate_distill(student: Llama, teacher: Any, rows: Sequence[dict[str, Tensor]], *, section: Any,
                     batch_size: int = 8) -> dict[str, float]:
    """Held-out metrics on one process: student CE (hard labels), full-vocabulary KL(teacher || student) at T = 1,
    the teacher's own CE, and how often the student's argmax is the teacher's (all over masked tokens)."""
    sums = {"student_loss": 0.0, "teacher_loss": 0.0, "kl": 0.0, "argmax_agreement": 0.0}
    count = 0.0
    for i in range(0, len(rows), batch_size):
        b = {k: torch.stack([r[k] for r in rows[i : i + batch_size]]) for k in rows[i]}
        mask = b["loss_mask"].float()
        s_logits = student(b["input_ids"], document_ids=b["document_ids"]).float()
        t_logits = teacher(b["input_ids"], document_ids=b["document_ids"]).float()
        vocab = torch.arange(t_logits.shape[-1]).expand_as(t_logits)
        ce = torch.nn.functional.cross_entropy
        sums["student_loss"] += float((ce(s_logits.transpose(1, 2), b["labels"], reduction="none") * mask).sum())
        sums["teacher_loss"] += float((ce(t_logits.transpose(1, 2), b["labels"], reduction="none") * mask).sum())
        sums["kl"] += float((distill_token_loss(s_logits, t_logits, vocab, kind="forward_kl") * mask).sum())
        sums["argmax_agreement"] += float((argmax_agreement(s_logits, t_logits.argmax(-1, keepdim=True)) * mask).sum())
        count += float(mask.sum())
    return {**{k: v / max(count, 1.0) for k, v in sums.items()}, "tokens": count, "loss": section.loss,
            "top_k": section.top_k, "temperature": section.temperature, "hard_label_weight": section.hard_label_weight}


def run_distill(cfg: DistillConfig, *, task: DistillTask | None = None,
                **loop_kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
    """Train (or precompute the teacher logits); rank 0 then evaluates on the held-out samples."""
    task = task or DistillTask(cfg)
    if cfg.distill.precompute_to:
        from rlhf.distill.precompute import precompute_teacher_logits

        return precompute_teacher_logits(task), None
    result = run_stage(cfg, task, **loop_kwargs)
    evaluation = None
    if rank() == 0 and result.reason == "completed" and len(task.valid_set):
        from model.checkpoints import from_pretrained
        from rlhf.paths import checkpoint_dir, resolve_path

        teacher = from_pretrained(checkpoint_dir(resolve_path(cfg.distill.teacher))) if cfg.distill.teacher else None
        if teacher is not None:
            rows = [task.valid_set[i] for i in range(len(task.valid_set))]
            evaluation = evaluate_distill(from_pretrained(task.cfg.run_dir / "final_model"), teacher, rows,
                                          section=cfg.distill)
            (task.cfg.run_dir / "distill_eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
            loop_kwargs.get("print_fn", print)(
                f"[distill] held-out: student loss {evaluation['student_loss']:.4f} (teacher "
                f"{evaluation['teacher_loss']:.4f}), KL {evaluation['kl']:.4f}, argmax agreement "
                f"{evaluation['argmax_agreement']:.3f}")
    return result, evaluation


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, config_cls=DistillConfig, task_cls=DistillTask, run=run_distill,
                      prog="python -m rlhf.distill", doc=__doc__,
                      example="--config configs/rlhf/distill_tiny.toml --distill.teacher=runs/teacher/final_model")


__all__ = ["DistillLoss", "DistillObjective", "DistillPipelineLoss", "DistillTask", "distill_loss_sum", "evaluate_distill",
           "main", "run_distill"]
