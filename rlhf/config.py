"""The shared base of the alignment stages' root configs (SFT, reward models): the pretraining ``RunConfig``
sections plus one section of the stage's own, TOML presets under ``configs/rlhf/`` and ``--section.key=value``
overrides. The stage configs themselves are ``rlhf.sft.config.SFTConfig`` and ``rlhf.reward.config.RewardConfig``.

    from rlhf.sft.config import SFTConfig
    cfg = SFTConfig.from_toml("configs/rlhf/sft_llama2.toml", ["--sft.init_checkpoint=runs/tiny/final_model"])
    cfg.validate(world_size=2)       # ValueError quoting the bad value and the fix

The stage configs *are* ``RunConfig`` s (subclasses), so ``train.loop.train`` and ``train.engine.TrainEngine``
take them unchanged; their extra section is ``[sft]`` resp. ``[rm]``. Differences from pretraining, all resolved
before the loop starts (``rlhf.stage.StageTask.resolve``):

- ``train.steps = 0`` (the default here) means "from the data": ``epochs x sequences (or pairs) / global batch``;
- ``[sft]/[rm] warmup_fraction`` sets ``optim.warmup_steps`` (Llama 2 RM: 3% of the steps, at least 5);
- with ``init_checkpoint`` set, the model's shape comes from that checkpoint (``model.name`` is ignored);
- file paths may start with ``{data_dir}``: ``$LLAMA_DATA_DIR``, else ``../shared/data`` beside the repo
  (``rlhf.paths``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.paths import checkpoint_dir, data_dir, resolve_path
from train.config import ConfigError, RunConfig, TrainSection, check

TEMPLATES = ("llama2", "llama3", "llama3_1")  # model.chat.TEMPLATES


@dataclass(frozen=True)
class StageSection:
    """Fields every alignment stage shares."""

    init_checkpoint: str = ""
    """Pretrained / SFT model to start from (native dir, HF dir, llama2.c file, or a run dir holding
    final_model/); "" = seeded random init of ``model.name``."""
    template: str = "llama2"
    """Chat format: "llama2" (``[INST] ... [/INST]``), "llama3" (header tokens; needs a Llama 3 tokenizer) or
    "llama3_1" (Meta's llama-models format: dated default system prompt, contents not stripped; ``model.chat``)."""
    epochs: int = 1
    """Passes over the training data when ``train.steps = 0``."""
    valid_fraction: float = 0.1
    """Share of prompts held out (deterministic sha1 of the prompt: ``rlhf.data.split_by_hash``)."""
    split_seed: str = "llama-rlhf-split-v1"
    """Salt of the hash split; every stage must use the same one so held-out prompts stay unseen."""
    max_records_per_file: int = 0
    """Read only the first N records of each file (quick runs and tests); 0 = all."""
    warmup_fraction: float = 0.0
    """``optim.warmup_steps = max(min_warmup_steps, round(fraction x steps))`` when > 0."""
    min_warmup_steps: int = 0
    """Lower bound of the derived warmup (Llama 2 reward models: 5)."""


@dataclass(frozen=True)
class LoRASection:
    """``[lora]``: low-rank adapters instead of full fine-tuning, for every stage built on ``StageConfig`` (SFT, reward
    models, DPO, distillation). The model's own weights are frozen (what a stage adds, e.g. a reward head, still
    trains); checkpoints hold the adapters; the export is the merged model plus the adapters in the PEFT format
    (``<final_model>_lora/``). See ``model/lora.py``."""

    rank: int = 0
    """Adapter rank r; 0 = off (train every weight)."""
    alpha: float = 16.0
    """The adapters' output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: str = "q,k,v,o"
    """Comma-separated projections to adapt: q, k, v, o, gate, up, down."""
    base_dtype: str = "fp32"
    """Dtype the frozen projection weights are held in: "fp32" or "bf16" (half their memory). At zero.stage=3 the
    base is partitioned over DP in the run's dtype instead (``train.dtype``); "bf16" there is refused."""

    def spec(self) -> Any:
        """The ``model.lora.LoRASpec``, or None when ``rank = 0``; a ConfigError names the bad field."""
        if self.rank == 0:
            return None
        from model.lora import LoRASpec

        spec = LoRASpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout, base_dtype=self.base_dtype,
                        targets=tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        try:
            return spec.validate()
        except ValueError as err:
            raise ConfigError(f"invalid run config: {err}") from err


def checkpoint_model_config(path: str | Path, *, key: str = "init_checkpoint") -> Any:
    """The ``LlamaConfig`` of a checkpoint without loading its weights where the format allows it."""
    from model.checkpoints import open_checkpoint

    p = checkpoint_dir(path)
    if not p.exists():
        raise ConfigError(f"{key} {path}: no such file or directory; point it at a pretraining or SFT "
                          "run's final_model/ (or the run directory)")
    return open_checkpoint(p).cfg  # native and HF: config.json + safetensors headers, no tensor read


@dataclass(frozen=True)
class StageConfig(RunConfig):
    """What the SFT and reward-model configs share; each subclass adds its section, named by ``STAGE``."""

    STAGE: typing.ClassVar[str] = ""
    PRESETS: typing.ClassVar[str] = "configs/rlhf/"
    UNUSED: typing.ClassVar[tuple[str, ...]] = ("data.path", "data.split")
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=0))
    """``train.steps = 0``: the number of steps comes from the data (``with_schedule``)."""
    lora: LoRASection = field(default_factory=LoRASection)
    """Low-rank adapters (``rank > 0``) instead of training every weight."""

    def engine_config(self) -> Any:
        """The run sections' engine config plus the ``[lora]`` adapters (None when off). ``seq_len`` 0: alignment
        batches vary in length; under sequence parallelism the engine pads each one to a multiple of TP (the
        objective's ``sequence_keys``; ``train.parallelize.pad_sequence_keys``)."""
        return dataclasses.replace(super().engine_config(), lora=self.lora.spec(), seq_len=0)

    @property
    def stage(self) -> StageSection:
        return getattr(self, self.STAGE)

    def model_config(self) -> Any:
        """The init checkpoint's config when there is one (plus ``[model.overrides]``), else the registry's."""
        if not self.stage.init_checkpoint:
            return super().model_config()
        cfg = checkpoint_model_config(resolve_path(self.stage.init_checkpoint))
        return cfg.replace(**self.model.overrides) if self.model.overrides else cfg

    def validate(self, *, world_size: int | None = None) -> Any:
        s, name = self.stage, self.STAGE
        _check(not self.data.synthetic, f"data.synthetic=true: {name} reads the files of [{name}]; set it false")
        self._validate_stage(world_size=world_size)
        self.check_unused()
        # The base checks, with the pretraining-only "data.path" requirement satisfied by our own files.
        RunConfig.validate(dataclasses.replace(self, data=dataclasses.replace(self.data, path=f"[{name}]")),
                           world_size=world_size)
        _check(bool(self.data.tokenizer), f"data.tokenizer is empty: set --data.tokenizer=PATH to the tokenizer "
               f"the model was trained with ({name} encodes chat text itself)")
        _check(resolve_path(self.data.tokenizer).is_file(),
               f"data.tokenizer={self.data.tokenizer!r}: file not found")
        _check(s.template in TEMPLATES, f"{name}.template={s.template!r}: use one of {list(TEMPLATES)}")
        _check(s.epochs >= 1, f"{name}.epochs={s.epochs}: must be >= 1")
        _check(0.0 <= s.valid_fraction < 1.0, f"{name}.valid_fraction={s.valid_fraction}: must be in [0, 1)")
        _check(0.0 <= s.warmup_fraction <= 1.0, f"{name}.warmup_fraction={s.warmup_fraction}: must be in [0, 1]")
        _check(s.max_records_per_file >= 0, f"{name}.max_records_per_file={s.max_records_per_file}: must be >= 0")
        _check(self.lora.rank >= 0, f"lora.rank={self.lora.rank}: must be >= 0 (0 = off)")
        self.lora.spec()
        return self

    def _validate_stage(self, *, world_size: int | None) -> None:
        raise NotImplementedError

    def with_schedule(self, *, num_samples: int) -> Any:
        """Steps from the data when ``train.steps == 0``, warmup from ``warmup_fraction``.

        ``num_samples``: training samples (packed sequences or pairs) over all ``epochs``."""
        s, t = self.stage, self.train
        steps = t.steps
        available = num_samples // t.global_batch_size
        if steps == 0:
            steps = available
            _check(steps >= 1, f"{self.STAGE}: {num_samples} training samples ({s.epochs} epoch(s)) do not fill one "
                   f"global batch of {t.global_batch_size}; lower train.global_batch_size or add data")
        _check(steps <= available, f"train.steps={steps} needs {steps * t.global_batch_size} samples but the data "
               f"gives {num_samples} ({s.epochs} epoch(s)); set train.steps=0 (from the data), lower it to "
               f"{available}, or raise {self.STAGE}.epochs")
        warmup = self.optim.warmup_steps
        if s.warmup_fraction > 0:
            warmup = max(s.min_warmup_steps, round(s.warmup_fraction * steps))
        return self.replace(train={"steps": steps}, optim={"warmup_steps": min(warmup, steps)})


def _check(ok: bool, message: str) -> None:
    check(ok, message, what="run config")


def check_files(paths: list[Path], where: str) -> None:
    for p in paths:
        _check(p.is_file(), f"{where}: {p} does not exist (a leading {{data_dir}} expands to {data_dir()}; set "
               "LLAMA_DATA_DIR to move it)")


def init_model_config(run_cfg: Any, init: str, *, key: str) -> Any:
    """The model shape of a stage that starts from ``init``: the checkpoint's own config (plus ``[model.overrides]``,
    e.g. a longer max_seq_len), so the checkpoint's shape never has to be repeated as flags; without ``init`` the
    registry's ``[model] name`` (``RunConfig.model_config``)."""
    if not init:
        return RunConfig.model_config(run_cfg)
    cfg = checkpoint_model_config(resolve_path(init), key=key)
    return cfg.replace(**run_cfg.model.overrides) if run_cfg.model.overrides else cfg
