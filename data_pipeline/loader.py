"""The pretraining datasets: megatron GPTDataset/BlendedDataset splits, and their micro-batch collate.

    from data_pipeline.loader import build_pretrain_datasets, pretrain_collate, check_tokenizer_matches
    from data_pipeline.global_batch import GlobalBatchLoader
    train, valid, test = build_pretrain_datasets(data_dir_or_blend="runs/data", seq_len=2048, seed=1234,
                                                 num_samples=(n_train, n_valid, n_test),
                                                 tokenizer_info=tok, cache_dir=None)
    loader = GlobalBatchLoader(train, collate=pretrain_collate(train.config.tokenizer.eod), global_batch_size=512,
                               micro_batch_size=4, dp_rank=r, dp_size=dp,
                               consumed_samples=ckpt.get("consumed_samples", 0))
    for mb in loader: ...    # {"input_ids", "labels", "loss_mask", "document_ids"}, each [mb, seq_len]

Order: ``data_pipeline/global_batch.py`` (the one loader of every stage): global batch ``b`` is samples
``[c0 + b*G, c0 + (b+1)*G)`` of the (already shuffled, seeded) megatron dataset, each DP rank a contiguous
``G/dp`` of it, so the order does not depend on the DP size and ``consumed_samples`` resumes exactly.

``document_ids[t]`` is the number of EOD tokens strictly before position ``t`` in the sample: the tokens of a
document and its closing EOD share an id, for a block-diagonal (document) attention mask.

Process groups: with ``cache_dir=None`` nothing needs ``torch.distributed``: megatron builds the indices on
the calling process and caches the per-source GPTDataset indices next to the shards
(``<prefix>/cache/GPTDataset_indices``, megatron's default). With ``cache_dir`` set, megatron's protocol is
rank 0 builds and caches, barrier, the other ranks load; if no process group is initialised (one process),
a private single-process gloo group is created for the build and destroyed afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from data_pipeline.blend import MixtureSpec, read_manifest
from data_pipeline.shard_io import mcore_datasets, validate_indexed


class _MegatronTokenizerShim:
    """What megatron's GPTDataset reads from a tokenizer: vocab_size, eod, pad, unique_identifiers."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size, self.eod, self.eos = int(vocab_size), int(eod), int(eod)
        self.pad = -1  # megatron's own "never a real token" pad: padded positions get loss_mask 0
        self.unique_identifiers = OrderedDict(cls="data_pipeline", vocab_size=self.vocab_size, eod=self.eod)


def _tokenizer_shim(info: dict | Any) -> _MegatronTokenizerShim:
    if isinstance(info, dict):
        eod = info.get("eod", info.get("eos_id"))
        if eod is None or "vocab_size" not in info:
            raise ValueError(f"tokenizer_info {info!r}: needs 'vocab_size' and 'eod' (or 'eos_id')")
        return _MegatronTokenizerShim(info["vocab_size"], eod)
    eod = getattr(info, "eos_id", None)
    if eod is None:
        eod = info.eod
    return _MegatronTokenizerShim(info.vocab_size, eod)


def _resolve_spec(data_dir_or_blend: Any) -> MixtureSpec:
    if isinstance(data_dir_or_blend, MixtureSpec):
        return data_dir_or_blend
    p = Path(data_dir_or_blend)
    if p.is_dir():
        return MixtureSpec.from_weights(p)
    if p.is_file() and p.suffix == ".json":
        return MixtureSpec.from_file(p)
    raise ValueError(f"data_dir_or_blend={data_dir_or_blend!r}: expected a prepared directory (manifest.json), "
                     "a mixture JSON file, or a MixtureSpec")


def _check_sources(spec: MixtureSpec, shim: _MegatronTokenizerShim, split_matrix: list, sizes: list[int]) -> None:
    """Refuse what megatron would not catch or would hang on: bad files, vocab mismatch, empty splits."""
    for e in spec.entries:
        stats = validate_indexed(e.prefix, expect_docs=e.documents, expect_tokens=e.tokens)
        man = Path(e.prefix).parent / "manifest.json"
        if man.is_file():
            tok = json.loads(man.read_text())["tokenizer"]
            if tok["vocab_size"] != shim.vocab_size or tok["eos_id"] != shim.eod:
                raise ValueError(f"{man}: data tokenized with vocab {tok['vocab_size']} / eos {tok['eos_id']}, "
                                 f"but tokenizer_info has vocab {shim.vocab_size} / eod {shim.eod}; "
                                 "re-run prepare with the model's tokenizer")
        n = stats["documents"]
        for i, (name, rng) in enumerate(zip(("train", "valid", "test"), split_matrix)):
            if rng is None or not sizes[i]:
                continue
            if int(round(rng[1] * n)) <= int(round(rng[0] * n)):
                # megatron would loop forever computing epochs of an empty split
                raise ValueError(f"{e.prefix}: {n} documents give the {name} split none; use more data, a "
                                 f"coarser split, or num_samples[{i}]=0")


@contextlib.contextmanager
def _process_group_for_cache(cache_dir: Path | None) -> Iterator[None]:
    import torch.distributed as dist

    if cache_dir is None or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_pretrain_datasets(*, data_dir_or_blend: Any, seq_len: int, seed: int, split: str = "98,1,1",
                            num_samples: tuple[int, int, int], tokenizer_info: dict | Any,
                            cache_dir: Path | None) -> tuple[Any, Any, Any]:
    """(train, valid, test) megatron datasets (BlendedDataset for several sources, GPTDataset for one);
    a split is None when its weight in ``split`` or its ``num_samples`` is 0."""
    mc = mcore_datasets()
    spec = _resolve_spec(data_dir_or_blend)
    shim = _tokenizer_shim(tokenizer_info)
    split_str, split_matrix = _split_matrix(split, num_samples)
    _check_sources(spec, shim, split_matrix, list(num_samples))
    prefixes, weights = spec.megatron_blend()
    cfg = mc.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=split_str, path_to_cache=str(cache_dir) if cache_dir is not None else None, tokenizer=shim,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mid_level_dataset_surplus=0.005)
    sizes = [int(n) for n in num_samples]
    with _process_group_for_cache(cache_dir), _quiet_megatron():
        built = mc.BlendedMegatronDatasetBuilder(mc.GPTDataset, sizes, lambda: True, cfg).build()
    return tuple(d if (d is not None and num_samples[i]) else None for i, d in enumerate(built))


def _split_matrix(split: str, num_samples: Sequence[int]) -> tuple[str, list[Any]]:
    """Megatron's split string and book-ends (a split with no samples requested gets weight 0: None)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    parts = [float(x) for x in split.replace("/", ",").split(",")]
    if len(parts) != 3:
        raise ValueError(f"split {split!r}: expected three comma-separated weights, e.g. '98,1,1'")
    parts = [p if num_samples[i] else 0.0 for i, p in enumerate(parts)]
    split_str = ",".join(str(p) for p in parts)
    return split_str, convert_split_vector_to_split_matrix(parse_and_normalize_split(split_str))


MID_LEVEL_SURPLUS = 0.005
"""``GPTDatasetConfig.mid_level_dataset_surplus`` of ``build_pretrain_datasets``: a blend asks each source for
this much more than its share."""


def sample_index_plan(*, data_dir_or_blend: Any, seq_len: int, split: str,
                      num_samples: tuple[int, int, int]) -> list[dict[str, Any]]:
    """What ``build_pretrain_datasets`` would build, without building it: per source and split, the documents and
    tokens of the split, the samples asked of it, the epochs megatron repeats it for and the peak bytes of its
    indices. Reads only the ``.idx`` files (memory-mapped); megatron's own arithmetic (``GPTDataset``):

    - epochs: the least E with ``E * tokens >= samples * seq_len + 1``;
    - document index: ``numpy.mgrid[0:E, 0:D]`` (int64, 2 x E x D) cast to int32: ~20 bytes per E x D;
    - sample index: (E * tokens - 1) // seq_len + 1 rows of 2 int32 (int64 past 2^31), shuffle index 4 bytes per
      sample (8 past 2^32); a blend adds 10 bytes per blended sample (int16 + int64), counted per source.
    """
    from data_pipeline.shard_io import read_index

    spec = _resolve_spec(data_dir_or_blend)
    _, matrix = _split_matrix(split, num_samples)
    prefixes, weights = spec.megatron_blend()
    plan = []
    for entry, weight in zip(spec.entries, weights):
        lengths = read_index(entry.prefix)["lengths"]
        n = len(lengths)
        for i, name in enumerate(("train", "valid", "test")):
            if matrix[i] is None or not num_samples[i]:
                continue
            beg, end = int(round(matrix[i][0] * float(n))), int(round(matrix[i][1] * float(n)))
            tokens = int(lengths[beg:end].sum(dtype="int64"))
            asked = (int(num_samples[i]) if len(prefixes) == 1 else
                     int(math.ceil(math.ceil(num_samples[i] * weight) * (1 + MID_LEVEL_SURPLUS))))
            need = asked * seq_len + 1
            epochs = -(-need // tokens) if tokens else 0  # 0: megatron would loop forever
            samples_built = (epochs * tokens - 1) // seq_len if epochs else 0
            big = max(epochs * (end - beg), int(lengths.max(initial=0))) > 2**31 - 1
            index_bytes = (20 * epochs * (end - beg) + (16 if big else 8) * (samples_built + 1)
                           + (8 if samples_built >= 2**32 - 2 else 4) * samples_built
                           + (10 * asked if len(prefixes) > 1 else 0))  # its share of the blend's index
            plan.append({"source": entry.name, "prefix": entry.prefix, "split": name, "documents": end - beg,
                         "tokens": tokens, "samples": asked, "epochs": epochs, "index_bytes": index_bytes})
    return plan


@contextlib.contextmanager
def _quiet_megatron() -> Iterator[None]:
    import logging
    import warnings

    lg = logging.getLogger("megatron.core.datasets")
    old = lg.level
    lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pad token id.*")
        try:
            yield
        finally:
            lg.setLevel(old)


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Number of EOD tokens strictly before each position (last dim)."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def collate_pretrain(samples: Sequence[dict[str, torch.Tensor]], *, eod: int) -> dict[str, torch.Tensor]:
    """Megatron ``GPTDataset`` samples (``tokens``, ``labels``, ``loss_mask``) -> one micro-batch with the
    document ids of the packed documents."""
    tokens = torch.stack([s["tokens"] for s in samples]).long()
    return {"input_ids": tokens, "labels": torch.stack([s["labels"] for s in samples]).long(),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
            "document_ids": document_ids(tokens, eod)}


def pretrain_collate(eod: int) -> Callable[[Sequence[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """The pretraining ``collate`` of ``data_pipeline.global_batch.GlobalBatchLoader`` (``eod``: the tokenizer's
    end-of-document id, ``dataset.config.tokenizer.eod`` for a megatron dataset)."""
    return functools.partial(collate_pretrain, eod=int(eod))


def check_tokenizer_matches(manifest_dir: str | Path, tokenizer: Any, model_vocab_size: int, *,
                            allow_padded_vocab: bool = False) -> None:
    """Refuse (ValueError naming the files and the fix) a tokenizer that does not match the data or model."""
    m = read_manifest(manifest_dir)
    man = Path(manifest_dir) / "manifest.json"
    want = m["tokenizer"]
    path = getattr(tokenizer, "path", "<tokenizer>")
    if tokenizer.file_hash() != want["sha256"]:
        raise ValueError(f"{path}: sha256 {tokenizer.file_hash()[:12]}... differs from the tokenizer the data in "
                         f"{man} was prepared with ({want['path']}, {want['sha256'][:12]}...); use that tokenizer "
                         "or re-run prepare with this one")
    if tokenizer.vocab_size != want["vocab_size"] or tokenizer.eos_id != want["eos_id"]:
        raise ValueError(f"{path}: vocab {tokenizer.vocab_size}/eos {tokenizer.eos_id} differs from {man} "
                         f"({want['vocab_size']}/{want['eos_id']}); re-run prepare with this tokenizer")
    ok = model_vocab_size == tokenizer.vocab_size or (allow_padded_vocab and model_vocab_size > tokenizer.vocab_size)
    if not ok:
        raise ValueError(f"{path}: tokenizer vocab {tokenizer.vocab_size} does not match the model config's "
                         f"vocab_size {model_vocab_size} (data: {man}); pick the model config that goes with "
                         "this tokenizer (e.g. llama2_* for the 32000-piece SentencePiece model)")
