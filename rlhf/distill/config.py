"""The root config of distillation: every pretraining ``RunConfig`` section plus ``[distill]``.

    from rlhf.distill.config import DistillConfig
    cfg = DistillConfig.from_toml("configs/rlhf/distill_tiny.toml", ["--distill.teacher=runs/big/final_model"])

``[distill] init_checkpoint`` is the student's start ("" = seeded random init of ``model.name``); the teacher is
``[distill] teacher``. Data (``distill.data``): "pretrain" reads ``data.path`` shards (or ``data.synthetic``) like
pretraining, with ``train.steps`` steps; "sft" reads dialogue files (``distill.files``) like ``rlhf.sft``, loss on the
answers only, steps from the data when ``train.steps = 0``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from rlhf.config import StageConfig, StageSection, check_files
from rlhf.distill.losses import KINDS
from rlhf.paths import file_list, resolve_path
from train.config import RunConfig, check

DATA_KINDS = ("pretrain", "sft")
TEACHER_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class DistillSection(StageSection):
    teacher: str = ""
    """The teacher checkpoint (native dir, HF dir, llama2.c file, or a run dir holding final_model/); it must share
    the student's tokenizer (same vocabulary)."""
    teacher_tp: int = 1
    """The teacher's own tensor-parallel size (consecutive blocks of ranks); independent of parallel.tp."""
    teacher_dtype: str = "fp32"
    """Dtype the teacher runs in: "fp32" or "bf16"."""
    teacher_logits: str = ""
    """Offline mode: a directory of precomputed top-k teacher logits (``rlhf.distill.offline``); no teacher runs."""
    precompute_to: str = ""
    """Write the teacher's top-k logits of every training sample to this directory and exit (no training)."""
    loss: str = "forward_kl"
    """Divergence: "forward_kl" (KL(teacher || student)), "reverse_kl" or "jsd" (generalised JSD, ``beta``)."""
    beta: float = 0.5
    """Generalised JSD interpolation (0 = forward KL, 1 = reverse KL)."""
    top_k: int = 0
    """Teacher logits kept per token (renormalised over them); 0 = the whole vocabulary."""
    temperature: float = 1.0
    """Softmax temperature of both teacher and student in the divergence (the loss is scaled by T^2)."""
    hard_label_weight: float = 0.0
    """Weight of the ordinary next-token cross entropy; the divergence gets 1 - this (1.0 = no distillation)."""
    data: str = "pretrain"
    """"pretrain" (data.path shards / data.synthetic; train.steps steps) or "sft" (dialogue ``files``)."""
    files: str = ""
    """data = "sft": comma-separated dialogue files (JSONL {"messages": [...]}, or HH-RLHF's chosen dialogues)."""
    epochs: int = 1
    """data = "sft": passes over the dialogues when train.steps = 0."""


@dataclass(frozen=True)
class DistillConfig(StageConfig):
    """Logit distillation: every RunConfig section plus ``[distill]``."""

    distill: DistillSection = field(default_factory=DistillSection)
    STAGE: typing.ClassVar[str] = "distill"
    UNUSED: typing.ClassVar[tuple[str, ...]] = ()

    @property
    def sft(self) -> typing.Any:
        """The ``[sft]`` view of ``[distill]`` that ``rlhf.sft``'s dialogue packing reads (data = "sft")."""
        from rlhf.sft.config import SFTSection

        d = self.distill
        return SFTSection(files=d.files, epochs=d.epochs, template=d.template, valid_fraction=d.valid_fraction,
                          split_seed=d.split_seed, max_records_per_file=d.max_records_per_file)

    @property
    def vocab_k(self) -> int:
        return self.distill.top_k or self.model_config().vocab_size

    def validate(self, *, world_size: int | None = None) -> typing.Any:
        if self.distill.data == "sft":
            return super().validate(world_size=world_size)
        self._validate_stage(world_size=world_size)
        RunConfig.validate(self, world_size=world_size)
        return self

    def _validate_stage(self, *, world_size: int | None) -> None:
        d = self.distill
        _check(d.data in DATA_KINDS, f"distill.data={d.data!r}: use one of {list(DATA_KINDS)}")
        _check(bool(d.teacher) or bool(d.teacher_logits), "distill.teacher is empty: give the teacher checkpoint "
               "(or distill.teacher_logits, a directory of precomputed top-k logits)")
        if d.teacher:
            _check(resolve_path(d.teacher).exists(), f"distill.teacher={d.teacher!r}: no such file or directory")
        _check(d.loss in KINDS, f"distill.loss={d.loss!r}: use one of {list(KINDS)}")
        _check(0.0 <= d.beta <= 1.0, f"distill.beta={d.beta}: must be in [0, 1]")
        _check(d.top_k >= 0, f"distill.top_k={d.top_k}: must be >= 0 (0 = whole vocabulary)")
        _check(d.temperature > 0, f"distill.temperature={d.temperature}: must be > 0")
        _check(0.0 <= d.hard_label_weight <= 1.0, f"distill.hard_label_weight={d.hard_label_weight}: must be in [0, 1]")
        _check(d.teacher_dtype in TEACHER_DTYPES, f"distill.teacher_dtype={d.teacher_dtype!r}: use {list(TEACHER_DTYPES)}")
        _check(d.teacher_tp >= 1, f"distill.teacher_tp={d.teacher_tp}: must be >= 1")
        if world_size is not None:
            _check(world_size % d.teacher_tp == 0, f"distill.teacher_tp={d.teacher_tp} must divide the {world_size} "
                   "ranks of the run (teacher groups are consecutive blocks of ranks)")
        if d.data == "sft":
            files = file_list(d.files)
            _check(bool(files), "distill.files is empty: give dialogue JSONL or HH-RLHF files (distill.data = sft)")
            check_files(files, "distill.files")
        else:
            _check(self.train.steps > 0, "distill.data=pretrain: set train.steps (the shards have no epoch count)")

    def with_schedule(self, *, num_samples: int) -> typing.Any:
        if self.distill.data == "sft":
            return super().with_schedule(num_samples=num_samples)
        return self


def _check(ok: bool, message: str) -> None:
    check(ok, message, what="run config")


__all__ = ["DistillConfig", "DistillSection"]
