"""The root config of reward-model training: every pretraining ``RunConfig`` section plus ``[rm]``.

    from rlhf.reward.config import RewardConfig
    cfg = RewardConfig.from_toml("configs/rlhf/rm_safety_llama2.toml", ["--rm.margin=small"])
    cfg.validate(world_size=2)       # ValueError quoting the bad value and the fix

The shared behaviour (steps from the data, warmup fraction, the init checkpoint's shape) is ``rlhf.config``'s.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from rlhf.config import StageConfig, StageSection, check_files
from rlhf.paths import file_list
from train.config import check

MIXTURES = ("helpfulness", "safety", "all")


@dataclass(frozen=True)
class RewardSection(StageSection):
    helpful_files: str = ""
    """Comma-separated helpfulness preference files: JSONL ``{"prompt", "chosen", "rejected", "rating"?}`` or
    HH-RLHF ``{"chosen", "rejected"}`` transcripts (e.g. helpful-base)."""
    safety_files: str = ""
    """Comma-separated safety preference files (e.g. HH-RLHF harmless-base); pairs are tagged is_safety."""
    mixture: str = "helpfulness"
    """"helpfulness": all helpful pairs + as many sampled from safety; "safety": all safety pairs mixed
    ``safety_fraction`` / rest with helpful pairs; "all": every pair of both (no resampling)."""
    safety_fraction: float = 0.9
    """Share of safety pairs in the "safety" mixture (Llama 2: 90/10)."""
    margin: str = "none"
    """Margin table m(rating) in the ranking loss: "none", "small" or "large" (``rlhf.losses.MARGIN_TABLES``)."""
    warmup_fraction: float = 0.03
    """Llama 2 reward models: warmup over 3% of the steps ..."""
    min_warmup_steps: int = 5
    """... but at least 5 steps."""


@dataclass(frozen=True)
class RewardConfig(StageConfig):
    """Reward-model training: every RunConfig section plus ``[rm]``."""

    rm: RewardSection = field(default_factory=RewardSection)
    STAGE: typing.ClassVar[str] = "rm"

    def _validate_stage(self, *, world_size: int | None) -> None:
        from rlhf.losses import MARGIN_TABLES

        r = self.rm
        check(self.parallel.pp == 1, f"parallel.pp={self.parallel.pp}: the reward model runs under tensor "
               "parallelism and ZeRO 1-3 but not pipeline parallelism (its head reads hidden states the pipeline's "
               "last stage turns into logits); use --parallel.pp=1 and --parallel.tp / --zero.stage instead")
        check(self.eval.every == 0, f"eval.every={self.eval.every}: [eval] runs language-model benchmarks, and a "
              "reward model has a scalar head instead; set eval.every=0 and measure it with "
              "`python -m rlhf.evaluate_rm` (held-out preference accuracy)")
        check(r.mixture in MIXTURES, f"rm.mixture={r.mixture!r}: use one of {list(MIXTURES)}")
        check(r.margin in MARGIN_TABLES, f"rm.margin={r.margin!r}: use one of {sorted(MARGIN_TABLES)}")
        check(0.0 < r.safety_fraction <= 1.0, f"rm.safety_fraction={r.safety_fraction}: must be in (0, 1]")
        helpful, safety = file_list(r.helpful_files), file_list(r.safety_files)
        check(bool(helpful or safety), "rm.helpful_files and rm.safety_files are both empty")
        if r.mixture == "helpfulness":
            check(bool(helpful), "rm.mixture=\"helpfulness\" needs rm.helpful_files")
        if r.mixture == "safety":
            check(bool(safety), "rm.mixture=\"safety\" needs rm.safety_files")
        check_files(helpful, "rm.helpful_files")
        check_files(safety, "rm.safety_files")
