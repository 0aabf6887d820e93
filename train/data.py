"""What pretraining reads: deterministic synthetic documents or ``python -m data_pipeline prepare`` shards.

    from train.data import build_datasets, seed_everything
    seed_everything(cfg.train.seed)
    train_ds, valid_ds, eod = build_datasets(cfg, cfg.model_config(), dp_size=1, run_dir=cfg.run_dir)

Both kinds are indexable datasets whose sample ``i`` depends only on (seed, i), so the loader
(``data_pipeline.global_batch.GlobalBatchLoader``) can hand any DP layout and any resume point the same data.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from train.config import ConfigError, RunConfig


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the weights are seeded by name, not by these)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SyntheticDataset:
    """Deterministic, learnable packed documents (arithmetic token runs ended by EOD=2), indexable like GPTDataset.

    Sample ``i`` depends only on (seed, offset + i), so any DP layout and any resume point see the same data.
    """

    EOD = 2

    def __init__(self, *, vocab_size: int, seq_len: int, seed: int, num_samples: int, offset: int = 0,
                 document_length: int = 0) -> None:
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.num_samples, self.offset = num_samples, offset
        # Document lengths: uniform in [L/2, 3L/2] for a mean L, else 4-47 tokens (short, learnable runs).
        self.lengths = (max(1, document_length // 2), document_length + document_length // 2 + 1) \
            if document_length > 0 else (4, 48)
        self.config = SimpleNamespace(tokenizer=SimpleNamespace(eod=self.EOD))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + int(i))
        usable = self.vocab_size - 3
        out, n = [], self.seq_len + 1
        while n > 0:
            length = int(torch.randint(*self.lengths, (1,), generator=g))
            start, stride = (int(x) for x in torch.randint(0, usable, (2,), generator=g))
            doc = (start + (stride % 7 + 1) * torch.arange(length)) % usable + 3
            out += [doc, torch.tensor([self.EOD])]
            n -= length + 1
        tokens = torch.cat(out)[: self.seq_len + 1]
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(self.seq_len)}


def build_datasets(cfg: RunConfig, model_cfg: Any, *, dp_size: int, run_dir: Path) -> tuple[Any, Any, int]:
    """(train dataset, valid dataset or None, eod id) for the configured source."""
    t = cfg.train
    n_train = t.steps * t.global_batch_size
    n_valid = t.eval_batches * t.micro_batch_size * dp_size if t.eval_every > 0 else 0
    if cfg.data.synthetic:
        common = dict(vocab_size=model_cfg.vocab_size, seq_len=cfg.data.seq_len, seed=t.seed,
                      document_length=cfg.data.synthetic_document_length)
        valid = SyntheticDataset(**common, num_samples=n_valid, offset=10**9) if n_valid else None
        return SyntheticDataset(**common, num_samples=n_train), valid, SyntheticDataset.EOD
    try:  # the data checks (data_pipeline cannot name our config keys): a ConfigError naming data.path
        train_ds, valid_ds, tok_info = _prepared_datasets(cfg, model_cfg, n_train=n_train, n_valid=n_valid,
                                                          run_dir=run_dir)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.path={cfg.data.path!r}: {err}") from err
    return train_ds, valid_ds, int(tok_info["eos_id"])


def _prepared_datasets(cfg: RunConfig, model_cfg: Any, *, n_train: int, n_valid: int,
                       run_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    from data_pipeline.blend import read_manifest
    from data_pipeline.loader import build_pretrain_datasets, check_tokenizer_matches

    path = Path(cfg.data.path)
    manifest_dir = path if path.is_dir() else None
    tok_info = read_manifest(manifest_dir)["tokenizer"] if manifest_dir else None
    if cfg.data.tokenizer and manifest_dir:
        from model.tokenizer import load_tokenizer

        check_tokenizer_matches(manifest_dir, load_tokenizer(cfg.data.tokenizer), model_cfg.vocab_size,
                                allow_padded_vocab=True)
    if tok_info is None:
        raise ConfigError(f"data.path={cfg.data.path!r}: expected a `python -m data_pipeline prepare` output "
                          "directory holding manifest.json")
    if tok_info["vocab_size"] > model_cfg.vocab_size:
        raise ConfigError(f"{path}/manifest.json: data tokenized with vocab {tok_info['vocab_size']} but model "
                          f"{model_cfg.name!r} has vocab_size={model_cfg.vocab_size}; set "
                          f"--model.overrides.vocab_size={tok_info['vocab_size']} or re-tokenize")
    train_ds, valid_ds, _ = build_pretrain_datasets(
        data_dir_or_blend=path, seq_len=cfg.data.seq_len, seed=cfg.train.seed, split=cfg.data.split,
        num_samples=(n_train, n_valid, 0), tokenizer_info=tok_info, cache_dir=run_dir / "data_cache")
    return train_ds, valid_ds, tok_info
