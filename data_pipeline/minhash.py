"""Near-duplicate document removal with MinHash signatures and banded LSH (streaming, first copy wins).

    from data_pipeline.minhash import MinHashDeduper
    dedup = MinHashDeduper(threshold=0.7, num_perm=128, ngram=5, seed=1234)
    is_dup, of_index = dedup.check_and_add(text)     # of_index: the earlier document it duplicates

Shingles are word ``ngram``-grams of the lower-cased word sequence. Each word is hashed once with CRC32
(deterministic across processes, unlike Python's ``hash``); a shingle hash is a polynomial combination of
its word hashes mod 2^64, computed for all shingles at once in numpy. The ``num_perm`` hash functions are
the multiply-shift family ``((a*x + b) mod 2^64) >> 32`` with odd ``a`` (2-universal) drawn from
``numpy.random.default_rng(seed)``, so signatures are identical run to run.

LSH: ``bands * rows <= num_perm`` chosen to minimise the false-positive + false-negative area for
``threshold`` (the same criterion as datasketch's ``MinHashLSH``). A candidate from any band is confirmed
only if the signature-estimated Jaccard similarity is ``>= threshold`` (fewer false positives than
"any band collides"). Memory: one 4*num_perm-byte signature plus ``bands`` dict entries per kept document;
at cluster scale run one index per hash-prefix bucket of documents (as CCNet / Llama 3 do per shard).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_POLY = np.uint64(1099511628211)  # FNV prime: mixes the position of a word in its shingle


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the word ``ngram``-grams of ``text`` (the whole text if shorter)."""
    words = _WORD_RE.findall(text.lower())
    if not words:
        return np.zeros(1, dtype=np.uint64)
    w = np.fromiter((zlib.crc32(x.encode("utf-8")) for x in words), dtype=np.uint64, count=len(words))
    n = min(ngram, len(w))
    m = len(w) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _POLY + w[k : k + m]
    return np.unique(h)


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact shingle Jaccard similarity (for tests and reports)."""
    x, y = set(shingle_hashes(a, ngram).tolist()), set(shingle_hashes(b, ngram).tolist())
    return len(x & y) / max(1, len(x | y))


def _integrate(f, a: float, b: float, steps: int = 200) -> float:
    h = (b - a) / steps
    return sum(f(a + (i + 0.5) * h) for i in range(steps)) * h


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising weighted false-positive and false-negative probability mass."""
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integrate(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold, 60)
            fn = _integrate(lambda s, b=b, r=r: (1 - s**r) ** b, threshold, 1.0, 60)
            err = fp_weight * fp + (1 - fp_weight) * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class MinHashDeduper:
    """Streaming near-duplicate filter: ``check_and_add`` says whether a text duplicates an earlier one."""

    def __init__(self, *, threshold: float = 0.7, num_perm: int = 128, ngram: int = 5, seed: int = 1234) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        rng = np.random.default_rng(seed)
        self._a = (rng.integers(0, 2**63, num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self._b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        self._tables: list[dict[bytes, int | list[int]]] = [{} for _ in range(self.bands)]
        self._sigs: list[np.ndarray] = []

    def shingle_hashes(self, text: str) -> np.ndarray:
        return shingle_hashes(text, self.ngram)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_shingles(self.shingle_hashes(text))

    def signature_of_shingles(self, x: np.ndarray) -> np.ndarray:
        """uint32[num_perm] MinHash signature of the uint64 shingle hashes ``x``."""
        with np.errstate(over="ignore"):
            # (num_perm, num_shingles) in chunks to bound memory on very long documents
            sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
            for i in range(0, len(x), 4096):
                chunk = x[i : i + 4096]
                hv = (self._a[:, None] * chunk[None, :] + self._b[:, None]) >> np.uint64(32)
                sig = np.minimum(sig, hv.min(axis=1))
        return sig.astype(np.uint32)

    def check_and_add(self, text: str) -> tuple[bool, int]:
        """(True, index of the earlier kept document) if near-duplicate; else (False, new index) and index it.

        A document is a near-duplicate iff some earlier *kept* document shares at least one band with it and
        their signatures agree on ``>= threshold`` of the hashes. Every kept document of a band bucket is a
        candidate (a bucket holds an int, and a list only once a second kept document lands in it), so the
        rule does not depend on which document happened to fill a bucket first; the datatrove engine's
        clustering step (``data_pipeline/dt/minhash_stages.py``) applies the same rule."""
        sig = self.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for table, key in zip(self._tables, keys):
            hit = table.get(key)
            for cand in (() if hit is None else hit if isinstance(hit, list) else (hit,)):
                if cand in seen:
                    continue
                seen.add(cand)
                if float(np.mean(self._sigs[cand] == sig)) >= self.threshold:
                    return True, cand
        idx = len(self._sigs)
        self._sigs.append(sig)
        for table, key in zip(self._tables, keys):
            hit = table.get(key)
            if hit is None:
                table[key] = idx
            elif isinstance(hit, list):
                hit.append(idx)
            else:
                table[key] = [hit, idx]
        return False, idx
