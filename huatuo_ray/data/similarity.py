"""Near-duplicate detection for Chinese text: ROUGE-L on characters, and MinHash to find candidates.

Self-instruct keeps an instruction only if its ROUGE-L similarity to everything kept so far stays
below a threshold (0.7 in the original work). Comparing against everything is quadratic, so
:class:`NearDuplicateIndex` first finds candidates with MinHash LSH over character 3-grams and
only computes ROUGE-L for those; a pair that shares no band is very unlikely to reach 0.7.
ROUGE-L uses a bit-parallel LCS (Hyyrö 2004), fast enough in pure Python for sentences.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC (full-width -> ASCII punctuation), lower case, no whitespace: for comparing only."""
    return _SPACE.sub("", unicodedata.normalize("NFKC", text).lower())


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings (bit-parallel)."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 over characters (beta = 1)."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(b), lcs / len(a)
    return 2 * precision * recall / (precision + recall)


def _shingles(text: str, n: int = 3) -> set[str]:
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


def _minhash(text: str, num_perm: int) -> list[int]:
    shingles = _shingles(text)
    return [
        min(
            int.from_bytes(hashlib.blake2b(f"{p}:{s}".encode(), digest_size=8).digest(), "big")
            for s in shingles
        )
        for p in range(num_perm)
    ]


class NearDuplicateIndex:
    """Texts kept so far; ``add`` refuses one whose ROUGE-L to a kept text reaches ``threshold``."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 32, bands: int = 16):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold, self.num_perm, self.bands = threshold, num_perm, bands
        self.rows = num_perm // bands
        self.texts: list[str] = []
        self._buckets: list[dict[tuple[int, ...], list[int]]] = [
            defaultdict(list) for _ in range(bands)
        ]

    def _bands(self, text: str) -> list[tuple[int, ...]]:
        sig = _minhash(text, self.num_perm)
        return [tuple(sig[b * self.rows : (b + 1) * self.rows]) for b in range(self.bands)]

    def most_similar(self, text: str) -> tuple[float, str | None]:
        """(highest ROUGE-L among candidates, that text)."""
        norm = normalise(text)
        candidates: set[int] = set()
        for band, key in enumerate(self._bands(norm)):
            candidates.update(self._buckets[band].get(key, ()))
        best, best_text = 0.0, None
        for i in candidates:
            score = rouge_l(norm, normalise(self.texts[i]))
            if score > best:
                best, best_text = score, self.texts[i]
        return best, best_text

    def add(self, text: str) -> bool:
        """Keep ``text`` unless a near duplicate is kept already; True when kept."""
        score, _ = self.most_similar(text)
        if score >= self.threshold:
            return False
        self.insert(text)
        return True

    def insert(self, text: str) -> None:
        """Keep ``text`` without checking it (e.g. a reference set to check others against)."""
        index = len(self.texts)
        self.texts.append(text)
        for band, key in enumerate(self._bands(normalise(text))):
            self._buckets[band][key].append(index)
