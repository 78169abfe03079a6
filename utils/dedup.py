"""Near-duplicate removal and train/test leakage control, on the verified MinHash/LSH
similarity of ``utils.minhash_lsh``.

The system this replaces kept 67% duplicates ("capital of France" 273 times). Here a generator
rejects a near-duplicate before it is kept (``NearDupIndex``), a finished list is deduplicated
with every removed item naming the kept item it duplicates (``deduplicate``), and a train/test
split keeps every near-duplicate group on one side (``plan_split``), re-checked by
``leakage_check``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np

from utils.minhash_lsh import (
    DedupConfig,
    MinHasher,
    SimilarityGraph,
    band_keys,
    choose_bands,
    jaccard,
    resolve_threshold,
    shingles,
    similarity_graph,
    texts_of,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


# ----------------------------------------------------------------------------- deduplication


def _leaders(graph: SimilarityGraph) -> list[tuple[int, float] | None]:
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
    threshold, config = resolve_threshold(threshold, config)
    texts = texts_of(texts, None)
    graph = similarity_graph(texts, threshold, config)
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
    threshold, config = resolve_threshold(threshold, config)
    graph = similarity_graph(texts_of(items, key), threshold, config)
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
        self.threshold, self.config = resolve_threshold(threshold, config)
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
    graph = similarity_graph(texts, threshold, config)
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
    threshold, config = resolve_threshold(threshold, config)
    train_texts = texts_of(train_texts, None)
    test_texts = texts_of(test_texts, None)
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
    threshold, config = resolve_threshold(threshold, config)
    texts = texts_of(texts, None)
    n_test = _n_test_for(len(texts), test_fraction, n_test)
    graph = similarity_graph(texts, threshold, config)
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
        texts_of(items, key),
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
    "LeakageReport",
    "NearDupIndex",
    "QueryResult",
    "RemovedItem",
    "SplitPlan",
    "deduplicate",
    "leakage_check",
    "near_duplicate_groups",
    "plan_split",
    "split_train_test",
]
