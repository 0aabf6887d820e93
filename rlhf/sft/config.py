"""The root config of supervised fine-tuning: every pretraining ``RunConfig`` section plus ``[sft]``.

    from rlhf.sft.config import SFTConfig
    cfg = SFTConfig.from_toml("configs/rlhf/sft_llama2.toml", ["--sft.init_checkpoint=runs/tiny/final_model"])
    cfg.validate(world_size=2)       # ValueError quoting the bad value and the fix

The shared behaviour (steps from the data, warmup fraction, the init checkpoint's shape) is ``rlhf.config``'s.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from rlhf.config import StageConfig, StageSection, check_files
from rlhf.paths import file_list
from train.config import check


@dataclass(frozen=True)
class SFTSection(StageSection):
    files: str = ""
    """Comma-separated dialogue files: JSONL ``{"messages": [...]}`` or HH-RLHF (its chosen dialogues)."""
    epochs: int = 2
    """Passes over the training dialogues (Llama 2 SFT: 2)."""


@dataclass(frozen=True)
class SFTConfig(StageConfig):
    """Supervised fine-tuning: every RunConfig section plus ``[sft]``."""

    sft: SFTSection = field(default_factory=SFTSection)
    STAGE: typing.ClassVar[str] = "sft"

    def engine_config(self) -> typing.Any:
        """``[lora]`` as every stage; ``seq_len``: SFT packs its dialogues into rows of exactly ``data.seq_len``
        tokens, so sequence parallelism runs here at tp > 1 like pretraining (the other stages' lengths vary)."""
        return dataclasses.replace(super().engine_config(), seq_len=self.data.seq_len)

    def _validate_stage(self, *, world_size: int | None) -> None:
        files = file_list(self.sft.files)
        check(bool(files), "sft.files is empty: give dialogue JSONL or HH-RLHF files, comma-separated")
        check_files(files, "sft.files")
