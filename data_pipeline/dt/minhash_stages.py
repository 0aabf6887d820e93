"""datatrove's four MinHash stages with our signatures and our near-duplicate rule.

    OurMinhashSignature(sigs, cleaning=cfg)              # stage 1 (per task): datatrove's, our shingles/hashes
    MinhashDedupBuckets(sigs, buckets, config=cfg_of(c)) # stage 2 (one task per band): datatrove's, unchanged
    FirstKeptCluster(buckets, remove, sigs, cleaning=c)  # stage 3 (one task): our rule, datatrove's file format
    MinhashDedupFilter(remove)                            # stage 4 (per task): datatrove's, unchanged

Stage 1 computes exactly the local engine's signature (``data_pipeline.minhash``: CRC32 word shingles,
multiply-shift hashes, ``num_perm`` of them, ``bands x rows`` from ``optimal_bands``) and writes the bands in
datatrove's bucket files, plus the whole signature per document (``full/<rank>.sig``, in document order) for
stage 3. Stage 2 is datatrove's: every pair of documents (in different tasks too) whose band is identical.

Stage 3 replaces datatrove's union-find (which removes every member of a connected cluster but the root
chosen by cluster size, and trusts every band collision) by the local engine's rule, so that both engines
keep the same documents: in stream order (task, document index), a document is a near-duplicate iff an
earlier *kept* document shares a band with it and their full signatures agree on ``>= threshold`` of the
hashes. Memory: the candidate pairs of all bands (as datatrove's stage 3), signatures read from memory maps.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupCluster, MinhashDedupSignature
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig

from data_pipeline.cleaning import CleaningConfig
from data_pipeline.minhash import MinHashDeduper, optimal_bands


def minhash_config(cleaning: CleaningConfig) -> MinhashConfig:
    """datatrove's config for our LSH layout: ``bands`` buckets of ``rows`` 32-bit hashes."""
    bands, rows = optimal_bands(cleaning.near_dup_threshold, cleaning.minhash_num_perm)
    return MinhashConfig(n_grams=cleaning.minhash_ngram, num_buckets=bands, hashes_per_bucket=rows,
                         seed=cleaning.seed, hash_config=HashConfig(precision=32))


def _deduper(cleaning: CleaningConfig) -> MinHashDeduper:
    return MinHashDeduper(threshold=cleaning.near_dup_threshold, num_perm=cleaning.minhash_num_perm,
                          ngram=cleaning.minhash_ngram, seed=cleaning.seed)


class OurMinhashSignature(MinhashDedupSignature):
    name = "🎯 MinHash stage 1 (our signatures)"

    def __init__(self, output_folder: str, *, cleaning: CleaningConfig) -> None:
        super().__init__(output_folder, config=minhash_config(cleaning))
        self.cleaning = cleaning
        self._full_out: Any = None

    @cached_property
    def deduper(self) -> MinHashDeduper:
        return _deduper(self.cleaning)

    def get_shingles(self, text: str) -> np.ndarray:
        return self.deduper.shingle_hashes(text)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        full = self.deduper.signature_of_shingles(shingles)
        self._full_out.write(full.tobytes())
        b, r = self.config.num_buckets, self.config.hashes_per_bucket
        return full[: b * r].reshape(b, r).tolist()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.output_folder.path) / "full" / f"{rank:05d}.sig"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as self._full_out:
            super().run(data, rank, world_size)
        self._full_out = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("deduper", "_full_out")}


class FirstKeptCluster(MinhashDedupCluster):
    name = "🎯 MinHash stage 3 (first kept copy wins, signature-confirmed)"

    def __init__(self, input_folder: str, output_folder: str, sig_folder: str, *,
                 cleaning: CleaningConfig) -> None:
        super().__init__(input_folder, output_folder, config=minhash_config(cleaning))
        self.sig_folder, self.cleaning = sig_folder, cleaning

    def _groups(self) -> tuple[list[list[tuple[int, int]]], dict[tuple[int, int], list[int]]]:
        """Documents sharing a band value: stage 2 writes consecutive pairs of each run of equal values."""
        groups: list[list[tuple[int, int]]] = []
        member: dict[tuple[int, int], list[int]] = defaultdict(list)
        for dup_file in sorted(self.input_folder.list_files(glob_pattern="*.dups")):
            parent: dict[tuple[int, int], tuple[int, int]] = {}

            def find(x: tuple[int, int], parent: dict = parent) -> tuple[int, int]:
                while parent.setdefault(x, x) != x:
                    parent[x] = parent[parent[x]]
                    x = parent[x]
                return x

            with self.input_folder.open(dup_file, "rb") as f:
                for f1, d1, f2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=self.lines_to_buffer):
                    ra, rb = find((f1, d1)), find((f2, d2))
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
            comps: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
            for node in parent:
                comps[find(node)].append(node)
            for nodes in comps.values():
                for node in nodes:
                    member[node].append(len(groups))
                groups.append(sorted(nodes))
        return groups, member

    def run(self, data: DocumentsPipeline = None, _: int = 0, world_size: int = 1) -> DocumentsPipeline:
        assert world_size == 1, "the near-duplicate decision is one pass in stream order: run one task"
        num_perm, threshold = self.cleaning.minhash_num_perm, self.cleaning.near_dup_threshold
        with self.track_time():
            groups, member = self._groups()
            sigs: dict[int, np.ndarray] = {}

            def sig(node: tuple[int, int]) -> np.ndarray:
                if node[0] not in sigs:
                    path = Path(self.sig_folder) / "full" / f"{node[0]:05d}.sig"
                    sigs[node[0]] = np.memmap(path, dtype=np.uint32, mode="r").reshape(-1, num_perm)
                return sigs[node[0]][node[1]]

            kept: set[tuple[int, int]] = set()
            removed: dict[int, list[int]] = defaultdict(list)
            for node in sorted(member):
                s = sig(node)
                earlier = {m for g in member[node] for m in groups[g] if m < node and m in kept}
                if any(float(np.mean(sig(m) == s)) >= threshold for m in sorted(earlier)):
                    removed[node[0]].append(node[1])
                    self.stat_update("to_remove")
                else:
                    kept.add(node)
                self.stat_update("candidates")
            for file, docs in removed.items():
                with self.output_folder.open(f"{file:06d}.remove", "wb") as f:
                    f.write(b"".join(struct.pack("<I", d) for d in sorted(docs)))
