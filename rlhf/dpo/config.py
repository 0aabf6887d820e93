"""The root config of DPO: every pretraining ``RunConfig`` section plus ``[dpo]``.

    from rlhf.dpo.config import DPOConfig
    cfg = DPOConfig.from_toml("configs/rlhf/dpo_llama3_1_8b.toml", ["--dpo.init_checkpoint=runs/sft"])
    cfg.validate(world_size=8)       # ConfigError quoting the bad value and the fix

Published Llama 3 values (Llama 3 Herd sec. 4.1.4): learning rate 1e-5, beta 0.1, formatting tokens masked out of
the DPO loss, NLL term on the chosen answers with coefficient 0.2. The reference model is the init checkpoint
(the round's SFT model), frozen; its log-probs are computed once, before the first step (``rlhf.dpo.train``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from rlhf.config import StageConfig, StageSection, check_files
from rlhf.losses import DPO_LOSSES
from rlhf.paths import file_list
from train.config import check


@dataclass(frozen=True)
class DPOSection(StageSection):
    files: str = ""
    """Comma-separated preference files, read as the reward model reads them (``rlhf.sources.load_pairs``): JSONL
    ``{"prompt", "chosen", "rejected", "rating"?}``, the graded Llama 2 format, or HH-RLHF transcripts."""
    beta: float = 0.1
    """DPO's KL strength: implicit reward = beta x log(pi / pi_ref) (Llama 3: 0.1)."""
    loss: str = "sigmoid"
    """"sigmoid" (DPO; with ``label_smoothing`` > 0 conservative DPO) or "ipo" (length-normalised IPO)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped preference labels for conservative DPO, in [0, 0.5); 0 = plain DPO."""
    nll_weight: float = 0.0
    """Weight of the length-normalised NLL of the chosen answer added to each pair's loss (Llama 3: 0.2)."""
    mask_formatting_tokens: bool = False
    """Leave the chat format's header / end-of-turn / bos / eos tokens out of the DPO log-probs (Llama 3: true);
    the NLL term still counts the end-of-turn token (the model must keep learning to stop)."""
    max_records_per_file: int = 0
    """Read only the first N records of each file (quick runs and tests); 0 = all."""


@dataclass(frozen=True)
class DPOConfig(StageConfig):
    """DPO: every RunConfig section plus ``[dpo]``."""

    dpo: DPOSection = field(default_factory=DPOSection)
    STAGE: typing.ClassVar[str] = "dpo"

    def _validate_stage(self, *, world_size: int | None) -> None:
        d = self.dpo
        files = file_list(d.files)
        check(bool(files), "dpo.files is empty: give preference files (JSONL or HH-RLHF), comma-separated")
        check_files(files, "dpo.files")
        check(d.loss in DPO_LOSSES, f"dpo.loss={d.loss!r}: use one of {list(DPO_LOSSES)}")
        check(d.beta > 0, f"dpo.beta={d.beta}: must be > 0 (Llama 3 uses 0.1)")
        check(0.0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing={d.label_smoothing}: must be in [0, 0.5)")
        check(d.loss == "sigmoid" or d.label_smoothing == 0.0,
              f"dpo.label_smoothing={d.label_smoothing} applies to dpo.loss=\"sigmoid\" only; set it to 0 for IPO")
        check(d.nll_weight >= 0, f"dpo.nll_weight={d.nll_weight}: must be >= 0 (Llama 3 uses 0.2)")
