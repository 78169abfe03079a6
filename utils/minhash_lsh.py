"""The similarity machinery under near-duplicate detection (pure Python + numpy): normalised
shingles, exact Jaccard, MinHash signatures, LSH banding, and the verified similarity graph of a
list of texts. ``utils.dedup`` uses it to deduplicate and to split train/test without leakage.

Every text is normalised, cut into shingles, summarised by a MinHash signature, and LSH banding
proposes candidate pairs; every candidate is then verified with the EXACT Jaccard similarity of
the shingle sets, so the threshold means what it says and MinHash only decides what gets
compared.

Default shingles: character 5-grams of the normalised text (``DedupConfig``). Instructions are
short, and word shingles are too coarse for them: "Tell a real-life story about courage." vs
"Give a real-life story about courage." share 4 of 6 word 3-shingles (Jaccard 0.67, below the
default threshold 0.7) but 28 of 36 character 5-grams (Jaccard 0.78, a near-duplicate), while
"What is the capital of France?" vs "Name three prime numbers." share no 5-gram (0.0). Word
shingles (k=3 by default) remain available with ``shingle_kind="word"``.

Hashing is stable across processes: shingles are hashed with ``zlib.crc32`` (never Python's
salted ``hash()``) and the permutations are multiply-add-shift universal hashes whose
coefficients come from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np

DEFAULT_THRESHOLD = 0.7
DEFAULT_NUM_PERM = 128
SHINGLE_KINDS = ("char", "word")
# Shingle hashes per numpy block: bounds the (shingles x num_perm) uint64 temporary (~16 MiB).
_BLOCK_SHINGLES = 16384
# Odd 64-bit constant that folds a band's rows into one bucket key; a collision only adds a
# candidate pair, which exact verification then rejects.
_BAND_MIX = np.uint64(0x9E3779B97F4A7C15)
# Apostrophes are deleted ("what's" -> "whats"), other punctuation becomes a space.
_APOSTROPHES = re.compile("['\u2019\u2018`]")
_ASCII_PUNCTUATION = str.maketrans(
    {chr(c): " " for c in range(128) if unicodedata.category(chr(c)).startswith("P")}
)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


@dataclass(frozen=True)
class DedupConfig:
    """Every knob of near-duplicate detection; ``from_dict`` reads the YAML ``dedup:`` block."""

    threshold: float = DEFAULT_THRESHOLD
    shingle_kind: str = "char"
    char_n: int = 5
    word_k: int = 3
    num_perm: int = DEFAULT_NUM_PERM
    seed: int = 0
    # LSH bands are chosen so a pair exactly at the threshold becomes a candidate with at least
    # this probability (more similar pairs: higher); 0.995 gives 32 bands x 4 rows at 0.7.
    min_recall: float = 0.995

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)
        if self.shingle_kind not in SHINGLE_KINDS:
            raise ValueError(
                f"shingle_kind must be one of {SHINGLE_KINDS}, got {self.shingle_kind!r}"
            )
        for name in ("char_n", "word_k", "num_perm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0.0 < self.min_recall < 1.0:
            raise ValueError(f"min_recall must be in (0, 1), got {self.min_recall!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DedupConfig:
        """Build from a mapping; unknown keys raise (a typo must not silently use a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown dedup config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(values))


DEFAULT_CONFIG = DedupConfig()


def resolve_threshold(
    threshold: float | None, config: DedupConfig | None
) -> tuple[float, DedupConfig]:
    """(threshold, config) to use: ``config`` or the default, the threshold given or the config's."""
    config = DEFAULT_CONFIG if config is None else config
    threshold = config.threshold if threshold is None else threshold
    _check_threshold(threshold)
    return float(threshold), config


# ----------------------------------------------------------------------------- shingles


def normalize_text(text: str) -> str:
    """NFKC, casefold, apostrophes deleted, other punctuation -> space, whitespace collapsed.

    Symbols (``+ = $ <``) are kept, only Unicode punctuation (category P*) is stripped.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).casefold())
    text = text.translate(_ASCII_PUNCTUATION)
    if not text.isascii():  # the per-character category lookup is only needed beyond ASCII
        text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def word_shingles(text: str, k: int = 3) -> frozenset[str]:
    """Word k-grams of the normalised text; a text of fewer than k words is one shingle."""
    words = normalize_text(text).split()
    k = min(k, len(words))  # short texts fall back to one shingle of all their words
    if k == 0:
        return frozenset({""})  # every empty text shares this one shingle
    return frozenset({" ".join(words[i : i + k]) for i in range(len(words) - k + 1)})


def char_shingles(text: str, n: int = 5) -> frozenset[str]:
    """Character n-grams of the normalised text; a text shorter than n is one shingle."""
    norm = normalize_text(text)
    if len(norm) <= n:
        return frozenset({norm})
    return frozenset({norm[i : i + n] for i in range(len(norm) - n + 1)})


def shingles(text: str, config: DedupConfig | None = None) -> frozenset[str]:
    """The shingle set ``config`` prescribes (never empty, so every text has a signature)."""
    config = DEFAULT_CONFIG if config is None else config
    if config.shingle_kind == "word":
        return word_shingles(text, config.word_k)
    return char_shingles(text, config.char_n)


def jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """Exact Jaccard similarity |a & b| / |a | b| (two empty sets: 1.0)."""
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def text_similarity(a: str, b: str, config: DedupConfig | None = None) -> float:
    """Exact Jaccard similarity of two texts' shingle sets."""
    return jaccard(shingles(a, config), shingles(b, config))


# ----------------------------------------------------------------------------- MinHash + LSH


class MinHasher:
    """Deterministic MinHash: ``num_perm`` universal hashes of crc32 shingle hashes."""

    def __init__(self, num_perm: int = DEFAULT_NUM_PERM, seed: int = 0):
        if isinstance(num_perm, bool) or not isinstance(num_perm, int) or num_perm < 1:
            raise ValueError(f"num_perm must be a positive integer, got {num_perm!r}")
        self.num_perm = num_perm
        rng = np.random.default_rng(seed)
        # Multiply-add-shift (Dietzfelbinger): h(x) = ((a*x + b) mod 2^64) >> 32 with odd a is
        # a 2-independent family from 32-bit keys to 32-bit values; uint64 arithmetic wraps.
        self._a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self._b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)

    def signatures(self, shingle_sets: Sequence[frozenset[str] | set[str]]) -> np.ndarray:
        """(len(shingle_sets), num_perm) uint32 signatures; every set must be non-empty."""
        n = len(shingle_sets)
        sig = np.empty((n, self.num_perm), dtype=np.uint32)
        if n == 0:
            return sig
        lengths = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=n)
        if (lengths == 0).any():
            raise ValueError(f"shingle set {int(np.argmin(lengths))} is empty")
        total = int(lengths.sum())
        # Set iteration order varies between processes, the minimum does not.
        hashes = np.fromiter(
            (zlib.crc32(s.encode("utf-8")) for shingle_set in shingle_sets for s in shingle_set),
            dtype=np.uint64,
            count=total,
        )
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        first = 0
        while first < n:
            # Largest run of sets from `first` whose shingles fit one block (at least one set).
            last = int(np.searchsorted(starts, starts[first] + _BLOCK_SHINGLES, side="right")) - 1
            last = min(max(last, first + 1), n)
            block = hashes[starts[first] : starts[last]]
            with np.errstate(over="ignore"):
                hv = (block[:, None] * self._a[None, :] + self._b[None, :]) >> np.uint64(32)
            sig[first:last] = np.minimum.reduceat(hv, starts[first:last] - starts[first], axis=0)
            first = last
        return sig


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash estimate of Jaccard: the fraction of permutations whose minima agree."""
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signature shapes differ: {sig_a.shape} vs {sig_b.shape}")
    return float(np.mean(sig_a == sig_b))


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """P(a pair of this Jaccard shares at least one LSH band) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def choose_bands(num_perm: int, threshold: float, min_recall: float = 0.995) -> tuple[int, int]:
    """(bands, rows): the most selective banding that still catches a pair at ``threshold``.

    Fewer candidates means less exact verification; recall is what must not be lost.
    """
    _check_threshold(threshold)
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= min_recall:
            return bands, rows
    return num_perm, 1


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 bucket keys: each band's ``rows`` minima folded into one integer."""
    if signatures.ndim != 2 or signatures.shape[1] < bands * rows:
        raise ValueError(f"signatures of shape {signatures.shape} cannot hold {bands}x{rows}")
    sig = signatures.astype(np.uint64)
    keys = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            keys = keys * _BAND_MIX + sig[:, r : bands * rows : rows]
    return keys


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """All (i, j), i < j, whose signatures agree on every row of at least one band."""
    keys = band_keys(signatures, bands, rows)
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        column = keys[:, band]
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        # Runs of equal keys are the buckets; only buckets of two or more give pairs.
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], len(ordered)]
        shared = ends - starts > 1
        for start, end in zip(starts[shared].tolist(), ends[shared].tolist(), strict=True):
            members = sorted(order[start:end].tolist())
            for x, i in enumerate(members):
                for j in members[x + 1 :]:
                    pairs.add((i, j))
    return pairs


class SimilarityGraph(NamedTuple):
    """Verified near-duplicate edges between the distinct shingle sets of a list of texts."""

    sets: list[frozenset[str]]  # distinct sets, in order of first occurrence
    set_of_text: list[int]  # text index -> index into ``sets``
    first_text: list[int]  # set index -> first text that has it
    edges: dict[int, dict[int, float]]  # set j -> {set i < j: exact Jaccard >= threshold}


def similarity_graph(
    texts: Sequence[str], threshold: float, config: DedupConfig
) -> SimilarityGraph:
    """The verified near-duplicate graph of ``texts``: LSH candidates kept when their exact
    Jaccard is >= ``threshold``. Identical shingle sets are merged first, so 273 copies cost one
    signature, not 37k pairs."""
    index_of: dict[frozenset[str], int] = {}
    sets: list[frozenset[str]] = []
    set_of_text: list[int] = []
    first_text: list[int] = []
    for t, text in enumerate(texts):
        s = shingles(text, config)
        u = index_of.get(s)
        if u is None:
            u = index_of[s] = len(sets)
            sets.append(s)
            first_text.append(t)
        set_of_text.append(u)
    edges: dict[int, dict[int, float]] = {}
    if len(sets) > 1:
        sig = MinHasher(config.num_perm, config.seed).signatures(sets)
        bands, rows = choose_bands(config.num_perm, threshold, config.min_recall)
        for i, j in lsh_candidate_pairs(sig, bands, rows):
            sim = jaccard(sets[i], sets[j])
            if sim >= threshold:
                edges.setdefault(j, {})[i] = sim
    return SimilarityGraph(sets, set_of_text, first_text, edges)


def texts_of(items: Sequence[Any], key: Callable[[Any], str] | str | None) -> list[str]:
    """The text of each item: the item itself, ``item[key]`` for a str key, or ``key(item)``."""
    texts = []
    for i, item in enumerate(items):
        if key is None:
            text = item
        elif isinstance(key, str):
            try:
                text = item[key]
            except (KeyError, TypeError, IndexError) as e:
                raise ValueError(f"item {i}: no field {key!r}") from e
        else:
            text = key(item)
        if not isinstance(text, str):
            raise TypeError(f"item {i}: text must be a str, got {type(text).__name__}")
        texts.append(text)
    return texts


__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_THRESHOLD",
    "DedupConfig",
    "MinHasher",
    "SimilarityGraph",
    "band_keys",
    "candidate_probability",
    "char_shingles",
    "choose_bands",
    "estimate_jaccard",
    "jaccard",
    "lsh_candidate_pairs",
    "normalize_text",
    "resolve_threshold",
    "shingles",
    "similarity_graph",
    "text_similarity",
    "texts_of",
    "word_shingles",
]
