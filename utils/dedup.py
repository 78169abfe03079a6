"""Near-duplicate detection, deduplication and train/test leakage control (pure Python + numpy).

The system this replaces kept 67% duplicates ("capital of France" 273 times). Here every text is
normalised, cut into shingles, summarised by a MinHash signature, and LSH banding proposes
candidate pairs; every candidate is then verified with the EXACT Jaccard similarity of the
shingle sets, so the threshold means what it says and MinHash only decides what gets compared.

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

import logging
import re
import unicodedata
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")

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


def _resolve(threshold: float | None, config: DedupConfig | None) -> tuple[float, DedupConfig]:
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


class _Graph(NamedTuple):
    """Verified near-duplicate edges between the distinct shingle sets of a list of texts."""

    sets: list[frozenset[str]]  # distinct sets, in order of first occurrence
    set_of_text: list[int]  # text index -> index into ``sets``
    first_text: list[int]  # set index -> first text that has it
    edges: dict[int, dict[int, float]]  # set j -> {set i < j: exact Jaccard >= threshold}


def _similarity_graph(texts: Sequence[str], threshold: float, config: DedupConfig) -> _Graph:
    """Identical shingle sets are merged first, so 273 copies cost one signature, not 37k pairs."""
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
    return _Graph(sets, set_of_text, first_text, edges)


def _texts_of(items: Sequence[Any], key: Callable[[Any], str] | str | None) -> list[str]:
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


# ----------------------------------------------------------------------------- deduplication


def _leaders(graph: _Graph) -> list[tuple[int, float] | None]:
    """Per distinct set, in first-occurrence order: None if kept, else (kept set, similarity).

    A set is removed when it is a near-duplicate of an already KEPT set; it then points to the
    most similar kept set (ties: the earliest). This is exactly what feeding the texts one by
    one to ``NearDupIndex.add`` does, and every removed text is within the threshold of its
    kept text (no transitive chains).
    """
    result: list[tuple[int, float] | None] = []
    for j in range(len(graph.sets)):
        best: tuple[int, float] | None = None
        for i, sim in sorted(graph.edges.get(j, {}).items()):
            if result[i] is None and (best is None or sim > best[1]):
                best = (i, sim)
        result.append(best)
    return result


@dataclass(frozen=True)
class RemovedItem:
    """An item dropped as a near-duplicate, with the kept item it duplicates (never silent)."""

    index: int  # position in the input
    item: Any
    duplicate_of: int  # position in the input of the kept item it duplicates
    similarity: float  # exact Jaccard with that kept item


def near_duplicate_groups(
    texts: Sequence[str], threshold: float | None = None, *, config: DedupConfig | None = None
) -> list[list[int]]:
    """Groups of >= 2 indices: a kept text (first) and the texts removed as its near-duplicates.

    Groups are in order of their kept text and each is sorted; texts with no near-duplicate
    are not listed. Every member is within ``threshold`` of the group's first index.
    """
    threshold, config = _resolve(threshold, config)
    texts = _texts_of(texts, None)
    graph = _similarity_graph(texts, threshold, config)
    leaders = _leaders(graph)
    members: dict[int, list[int]] = {}
    for t, u in enumerate(graph.set_of_text):
        lead = leaders[u]
        kept_text = graph.first_text[u if lead is None else lead[0]]
        members.setdefault(kept_text, []).append(t)
    return [group for _, group in sorted(members.items()) if len(group) > 1]


def deduplicate(
    items: Sequence[T],
    key: Callable[[T], str] | str | None = None,
    threshold: float | None = None,
    *,
    config: DedupConfig | None = None,
) -> tuple[list[T], list[RemovedItem]]:
    """(kept, removed): first occurrences kept in input order; each removed item names its match.

    ``key``: None for a list of str, a field name for dicts, or a callable returning the text.
    """
    threshold, config = _resolve(threshold, config)
    graph = _similarity_graph(_texts_of(items, key), threshold, config)
    leaders = _leaders(graph)
    kept: list[T] = []
    removed: list[RemovedItem] = []
    for t, u in enumerate(graph.set_of_text):
        if graph.first_text[u] == t and leaders[u] is None:
            kept.append(items[t])
        elif leaders[u] is None:  # an exact copy (same shingle set) of a kept text
            removed.append(RemovedItem(t, items[t], graph.first_text[u], 1.0))
        else:
            lead, sim = leaders[u]
            removed.append(RemovedItem(t, items[t], graph.first_text[lead], sim))
    return kept, removed


class QueryResult(NamedTuple):
    is_duplicate: bool
    match_index: int | None  # index (in add order) of the most similar stored text, if a dup
    similarity: float  # exact Jaccard with that text; 0.0 when not a duplicate


class NearDupIndex:
    """Incremental near-duplicate filter: a generator rejects a text before it is kept.

    ``add`` stores a text only when no stored text is within the threshold, so feeding texts
    one by one keeps exactly what ``deduplicate`` keeps.
    """

    def __init__(self, threshold: float | None = None, *, config: DedupConfig | None = None):
        self.threshold, self.config = _resolve(threshold, config)
        self._hasher = MinHasher(self.config.num_perm, self.config.seed)
        self._bands, self._rows = choose_bands(
            self.config.num_perm, self.threshold, self.config.min_recall
        )
        self._texts: list[str] = []
        self._sets: list[frozenset[str]] = []
        self._exact: dict[frozenset[str], int] = {}
        self._buckets: list[dict[int, list[int]]] = [{} for _ in range(self._bands)]

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def texts(self) -> list[str]:
        """The stored (kept) texts, in the order they were added."""
        return list(self._texts)

    def _keys(self, s: frozenset[str]) -> list[int]:
        return band_keys(self._hasher.signatures([s]), self._bands, self._rows)[0].tolist()

    def _best(self, s: frozenset[str], keys: list[int]) -> QueryResult:
        exact = self._exact.get(s)
        if exact is not None:
            return QueryResult(True, exact, 1.0)
        candidates: set[int] = set()
        for band, k in enumerate(keys):
            candidates.update(self._buckets[band].get(k, ()))
        best = QueryResult(False, None, 0.0)
        for i in sorted(candidates):
            sim = jaccard(s, self._sets[i])
            if sim >= self.threshold and sim > best.similarity:
                best = QueryResult(True, i, sim)
        return best

    def query(self, text: str) -> QueryResult:
        """Is ``text`` a near-duplicate of a stored text? (is_duplicate, match_index, similarity)."""
        s = shingles(text, self.config)
        return self._best(s, self._keys(s))

    def add(self, text: str) -> bool:
        """Store ``text`` and return True, or return False (nothing stored) if it is a near-dup."""
        s = shingles(text, self.config)
        keys = self._keys(s)
        if self._best(s, keys).is_duplicate:
            return False
        index = len(self._texts)
        self._texts.append(text)
        self._sets.append(s)
        self._exact[s] = index
        for band, k in enumerate(keys):
            self._buckets[band].setdefault(k, []).append(index)
        return True


# ----------------------------------------------------------------------------- train/test


@dataclass(frozen=True)
class LeakageReport:
    """How many test texts are near-duplicates of some train text."""

    n_test: int
    n_leaked: int
    rate: float
    threshold: float
    # (test text, most similar train text, exact Jaccard), most similar first, at most max_examples
    examples: list[tuple[str, str, float]] = field(default_factory=list)
    leaked_test_indices: list[int] = field(default_factory=list)


def _leak_matches(
    train_texts: Sequence[str], test_texts: Sequence[str], threshold: float, config: DedupConfig
) -> dict[int, tuple[int, float]]:
    """test index -> (most similar train index, Jaccard) for every leaked test text."""
    texts = list(train_texts) + list(test_texts)
    n_train = len(train_texts)
    graph = _similarity_graph(texts, threshold, config)
    train_of_set: dict[int, int] = {}  # distinct set -> its first train text
    for t in range(n_train):
        train_of_set.setdefault(graph.set_of_text[t], t)
    neighbours: dict[int, dict[int, float]] = {}  # undirected view of the verified edges
    for j, row in graph.edges.items():
        for i, sim in row.items():
            neighbours.setdefault(i, {})[j] = sim
            neighbours.setdefault(j, {})[i] = sim
    matches: dict[int, tuple[int, float]] = {}
    for k in range(len(test_texts)):
        u = graph.set_of_text[n_train + k]
        if u in train_of_set:
            matches[k] = (train_of_set[u], 1.0)
            continue
        best: tuple[int, float] | None = None
        for v, sim in neighbours.get(u, {}).items():
            if v in train_of_set and (
                best is None or (sim, -train_of_set[v]) > (best[1], -best[0])
            ):
                best = (train_of_set[v], sim)
        if best is not None:
            matches[k] = best
    return matches


def leakage_check(
    train_texts: Sequence[str],
    test_texts: Sequence[str],
    threshold: float | None = None,
    *,
    config: DedupConfig | None = None,
    max_examples: int = 10,
) -> LeakageReport:
    """Test texts within ``threshold`` (exact Jaccard, LSH candidates) of any train text."""
    threshold, config = _resolve(threshold, config)
    train_texts = _texts_of(train_texts, None)
    test_texts = _texts_of(test_texts, None)
    if not test_texts:
        raise ValueError("test_texts is empty: a leakage rate needs at least one test text")
    matches = _leak_matches(train_texts, test_texts, threshold, config)
    ranked = sorted(matches.items(), key=lambda kv: (-kv[1][1], kv[0]))
    examples = [(test_texts[k], train_texts[i], sim) for k, (i, sim) in ranked[:max_examples]]
    return LeakageReport(
        n_test=len(test_texts),
        n_leaked=len(matches),
        rate=len(matches) / len(test_texts),
        threshold=threshold,
        examples=examples,
        leaked_test_indices=sorted(matches),
    )


@dataclass(frozen=True)
class SplitPlan:
    """Index-level result of ``plan_split``: what went where and why."""

    train_indices: list[int]
    test_indices: list[int]
    n_test_requested: int
    n_groups: int  # near-duplicate components of >= 2 texts, each kept on one side
    n_grouped: int  # texts in those components
    leakage: LeakageReport  # independent check of the final split (n_leaked is 0)


def _n_test_for(n: int, test_fraction: float | None, n_test: int | None) -> int:
    if (test_fraction is None) == (n_test is None):
        raise ValueError("give exactly one of test_fraction and n_test")
    if test_fraction is not None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        n_test = round(test_fraction * n)
    if isinstance(n_test, bool) or not isinstance(n_test, int):
        raise ValueError(f"n_test must be an integer, got {n_test!r}")
    if not 1 <= n_test < n:
        raise ValueError(f"n_test must be in [1, {n - 1}] for {n} items, got {n_test}")
    return n_test


def plan_split(
    texts: Sequence[str],
    *,
    test_fraction: float | None = None,
    n_test: int | None = None,
    seed: int = 0,
    threshold: float | None = None,
    config: DedupConfig | None = None,
) -> SplitPlan:
    """Deterministic train/test split in which no test text is a near-duplicate of a train text.

    Texts are grouped into connected components of the near-duplicate graph (all verified
    pairs >= threshold, transitively), so a whole component lands on one side. Components are
    shuffled with ``seed`` and moved to test while they fit, so the test set can end up smaller
    than requested when only large components remain; ``leakage`` re-checks the result.
    """
    threshold, config = _resolve(threshold, config)
    texts = _texts_of(texts, None)
    n_test = _n_test_for(len(texts), test_fraction, n_test)
    graph = _similarity_graph(texts, threshold, config)
    parent = list(range(len(graph.sets)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for j, row in graph.edges.items():
        for i in row:
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    components: dict[int, list[int]] = {}
    for t, u in enumerate(graph.set_of_text):
        components.setdefault(find(u), []).append(t)
    ordered = [components[root] for root in sorted(components)]  # by first text: stable
    rng = np.random.default_rng(seed)
    remaining = n_test
    test: list[int] = []
    for c in rng.permutation(len(ordered)).tolist():
        if 0 < len(ordered[c]) <= remaining:
            test.extend(ordered[c])
            remaining -= len(ordered[c])
    test_set = set(test)
    test_indices = sorted(test_set)
    train_indices = [t for t in range(len(texts)) if t not in test_set]
    groups = [c for c in ordered if len(c) > 1]
    if remaining:
        logger.warning(
            "split: test set has %d texts, %d requested (near-duplicate groups did not fit)",
            len(test_indices),
            n_test,
        )
    leakage = leakage_check(
        [texts[t] for t in train_indices],
        [texts[t] for t in test_indices],
        threshold,
        config=config,
    )
    return SplitPlan(
        train_indices=train_indices,
        test_indices=test_indices,
        n_test_requested=n_test,
        n_groups=len(groups),
        n_grouped=sum(len(g) for g in groups),
        leakage=leakage,
    )


def split_train_test(
    items: Sequence[T],
    *,
    test_fraction: float | None = None,
    n_test: int | None = None,
    seed: int = 0,
    key: Callable[[T], str] | str | None = None,
    threshold: float | None = None,
    config: DedupConfig | None = None,
) -> tuple[list[T], list[T]]:
    """(train, test) in input order, leak-free by ``plan_split`` (call that for the report)."""
    plan = plan_split(
        _texts_of(items, key),
        test_fraction=test_fraction,
        n_test=n_test,
        seed=seed,
        threshold=threshold,
        config=config,
    )
    logger.info(
        "split: %d train, %d test (%d requested); %d near-duplicate groups (%d texts) kept whole",
        len(plan.train_indices),
        len(plan.test_indices),
        plan.n_test_requested,
        plan.n_groups,
        plan.n_grouped,
    )
    return [items[t] for t in plan.train_indices], [items[t] for t in plan.test_indices]


__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_THRESHOLD",
    "DedupConfig",
    "LeakageReport",
    "MinHasher",
    "NearDupIndex",
    "QueryResult",
    "RemovedItem",
    "SplitPlan",
    "band_keys",
    "candidate_probability",
    "char_shingles",
    "choose_bands",
    "deduplicate",
    "estimate_jaccard",
    "jaccard",
    "leakage_check",
    "lsh_candidate_pairs",
    "near_duplicate_groups",
    "normalize_text",
    "plan_split",
    "shingles",
    "split_train_test",
    "text_similarity",
    "word_shingles",
]
