"""Near-duplicate detection (utils/minhash_lsh.py), dedup, incremental index, leak-free split
(utils/dedup.py)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.dedup import (
    NearDupIndex,
    deduplicate,
    leakage_check,
    near_duplicate_groups,
    plan_split,
    split_train_test,
)
from utils.minhash_lsh import (
    DedupConfig,
    MinHasher,
    candidate_probability,
    char_shingles,
    choose_bands,
    estimate_jaccard,
    jaccard,
    lsh_candidate_pairs,
    normalize_text,
    shingles,
    text_similarity,
    word_shingles,
)

COURAGE_TELL = "Tell a real-life story about courage."
COURAGE_GIVE = "Give a real-life story about courage."
FRANCE = "What is the capital of France?"
PRIMES = "Name three prime numbers."
REPO = Path(__file__).resolve().parents[1]

# Word 1-shingles make similarities countable by hand: sets of words.
WORDSET = DedupConfig(shingle_kind="word", word_k=1)
A = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
B = A.replace("juliet", "kilo")  # J(A, B) = 9/11
C = B.replace("india", "lima")  # J(B, C) = 9/11, J(A, C) = 8/12 < 0.7


def _vocabulary(rng: random.Random, size: int = 400) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(size)]


def _brute_force_leaders(texts: list[str], threshold: float) -> list[tuple[int, float] | None]:
    """Reference dedup without MinHash: each text vs every earlier kept text, exact Jaccard."""
    sets = [shingles(t) for t in texts]
    kept: list[int] = []
    out: list[tuple[int, float] | None] = []
    for j, s in enumerate(sets):
        best = None
        for i in kept:
            sim = jaccard(sets[i], s)
            if sim >= threshold and (best is None or sim > best[1]):
                best = (i, sim)
        out.append(best)
        if best is None:
            kept.append(j)
    return out


def test_normalize_text_lowercases_strips_punctuation_and_collapses_whitespace():
    assert normalize_text("  Tell a REAL-life\tstory!!  ") == "tell a real life story"
    assert normalize_text("What\u2019s 2+2?") == "whats 2+2"  # apostrophe deleted, symbol kept
    assert normalize_text("\u00bfQu\u00e9 tal?\u2014bien") == "qu\u00e9 tal bien"
    assert normalize_text("###") == ""


def test_shingles_by_hand_and_short_text_fallback():
    assert char_shingles("Hello, World", 5) == {
        "hello",
        "ello ",
        "llo w",
        "lo wo",
        "o wor",
        " worl",
        "world",
    }
    assert char_shingles("Hi!", 5) == {"hi"}  # shorter than n: the whole text is one shingle
    assert char_shingles("?!", 5) == {""}  # every empty text shares one shingle
    assert word_shingles("a b c d", 3) == {"a b c", "b c d"}
    assert word_shingles("Hello there.", 3) == {"hello there"}  # fewer than k words
    assert word_shingles("", 3) == {""}


def test_required_examples_at_default_threshold():
    # 28 shared of 36 distinct character 5-grams; the default threshold is 0.7.
    assert text_similarity(COURAGE_TELL, COURAGE_GIVE) == pytest.approx(28 / 36)
    assert text_similarity(FRANCE, PRIMES) == 0.0
    # Why the default is not word 3-shingles: 4 shared of 6 would miss this pair.
    word3 = DedupConfig(shingle_kind="word", word_k=3)
    assert text_similarity(COURAGE_TELL, COURAGE_GIVE, word3) == pytest.approx(4 / 6)
    texts = [COURAGE_TELL, FRANCE, COURAGE_GIVE, PRIMES]
    assert near_duplicate_groups(texts) == [[0, 2]]
    kept, removed = deduplicate(texts)
    assert kept == [COURAGE_TELL, FRANCE, PRIMES]
    assert [(r.index, r.duplicate_of) for r in removed] == [(2, 0)]
    assert removed[0].item == COURAGE_GIVE
    assert removed[0].similarity == pytest.approx(28 / 36)


def test_deduplicate_keeps_first_is_order_stable_and_records_every_removal():
    items = [
        {"id": 0, "instruction": PRIMES},
        {"id": 1, "instruction": COURAGE_GIVE},
        {"id": 2, "instruction": "name three prime numbers"},  # exact after normalisation
        {"id": 3, "instruction": FRANCE},
        {"id": 4, "instruction": COURAGE_TELL},
    ]
    kept, removed = deduplicate(items, key="instruction")
    assert [k["id"] for k in kept] == [0, 1, 3]
    assert [(r.index, r.duplicate_of, r.similarity) for r in removed] == [
        (2, 0, 1.0),
        (4, 1, pytest.approx(28 / 36)),
    ]
    assert len(kept) + len(removed) == len(items)  # nothing dropped silently
    kept_fn, _ = deduplicate(items, key=lambda r: r["instruction"])
    assert kept_fn == kept


def test_removed_item_points_to_kept_item_not_a_transitive_chain():
    assert text_similarity(A, B, WORDSET) == pytest.approx(9 / 11)
    assert text_similarity(A, C, WORDSET) == pytest.approx(8 / 12)
    kept, removed = deduplicate([A, B, C], config=WORDSET)
    # B is removed as A's duplicate; C only resembles the removed B, so it is kept.
    assert kept == [A, C]
    assert [(r.index, r.duplicate_of) for r in removed] == [(1, 0)]
    assert near_duplicate_groups([A, B, C], config=WORDSET) == [[0, 1]]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="item 1: no field 'instruction'"):
        deduplicate([{"instruction": "x"}, {"text": "y"}], key="instruction")
    with pytest.raises(TypeError, match="item 0: text must be a str"):
        deduplicate([3])
    with pytest.raises(ValueError, match="threshold must be in"):
        deduplicate(["a"], threshold=1.5)
    with pytest.raises(ValueError, match=r"unknown dedup config key\(s\) \['treshold'\]"):
        DedupConfig.from_dict({"treshold": 0.7})
    with pytest.raises(ValueError, match="shingle_kind"):
        DedupConfig(shingle_kind="token")
    assert DedupConfig.from_dict({"threshold": 0.8, "char_n": 4}) == DedupConfig(0.8, char_n=4)


def test_minhash_estimate_is_close_to_exact_jaccard():
    hasher = MinHasher(num_perm=256, seed=1)
    for shared in (0, 20, 50, 80):
        a = {f"tok{i}" for i in range(100)}
        b = {f"tok{i}" for i in range(100 - shared, 200 - shared)}
        exact = jaccard(a, b)  # shared / (200 - shared)
        sig = hasher.signatures([a, b])
        assert estimate_jaccard(sig[0], sig[1]) == pytest.approx(exact, abs=0.08), shared
    same = hasher.signatures([{"x", "y"}, {"y", "x"}])
    assert estimate_jaccard(same[0], same[1]) == 1.0
    with pytest.raises(ValueError, match="shingle set 1 is empty"):
        hasher.signatures([{"x"}, set()])


def test_band_choice_matches_the_s_curve():
    bands, rows = choose_bands(128, 0.7)
    assert (bands, rows) == (32, 4)
    assert candidate_probability(0.7, 32, 4) == pytest.approx(1 - (1 - 0.7**4) ** 32)
    # 5 rows would catch a pair at exactly 0.7 with probability < 0.995.
    assert candidate_probability(0.7, 25, 5) < 0.995 <= candidate_probability(0.7, 32, 4)


def test_lsh_recall_and_agreement_with_brute_force():
    rng = random.Random(0)
    vocab = _vocabulary(rng)
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 14))) for _ in range(150)]
    variants = []
    for text in base[:100]:  # change one word: Jaccard typically 0.75-0.9
        words = text.split()
        words[rng.randrange(len(words))] = "zzz"
        variants.append(" ".join(words))
    texts = base + variants
    sets = [shingles(t) for t in texts]
    true_pairs = {
        (i, j)
        for i in range(len(sets))
        for j in range(i + 1, len(sets))
        if jaccard(sets[i], sets[j]) >= 0.7
    }
    assert len(true_pairs) >= 50  # the construction really produces near-duplicates
    sig = MinHasher(128, seed=0).signatures(sets)
    found = lsh_candidate_pairs(sig, *choose_bands(128, 0.7)) & true_pairs
    assert len(found) / len(true_pairs) >= 0.98
    # End to end, the LSH dedup equals exhaustive exact-Jaccard dedup on this set.
    reference = _brute_force_leaders(texts, 0.7)
    _, removed = deduplicate(texts)
    assert {r.index: (r.duplicate_of, pytest.approx(r.similarity)) for r in removed} == {
        j: lead for j, lead in enumerate(reference) if lead is not None
    }


def test_near_dup_index_rejects_as_it_goes_and_matches_batch_dedup():
    index = NearDupIndex()
    assert index.add(COURAGE_TELL) is True
    assert index.add(FRANCE) is True
    result = index.query(COURAGE_GIVE)
    assert result.is_duplicate and result.match_index == 0
    assert result.similarity == pytest.approx(28 / 36)
    assert index.add(COURAGE_GIVE) is False
    assert len(index) == 2 and index.texts == [COURAGE_TELL, FRANCE]
    assert index.query("what is the capital of france") == (True, 1, 1.0)
    assert index.query(PRIMES) == (False, None, 0.0)

    rng = random.Random(3)
    vocab = _vocabulary(rng, 60)
    texts = [" ".join(rng.choice(vocab) for _ in range(6)) for _ in range(80)]
    texts += [t.replace(t.split()[-1], "end", 1) for t in texts[:40]] + texts[:10]
    rng.shuffle(texts)
    incremental = NearDupIndex()
    assert [t for t in texts if incremental.add(t)] == deduplicate(texts)[0]


def test_signatures_are_deterministic_across_processes():
    sets = [shingles(t) for t in (COURAGE_TELL, FRANCE, PRIMES)]
    first = MinHasher(64, seed=5).signatures(sets)
    assert np.array_equal(first, MinHasher(64, seed=5).signatures(sets))
    assert not np.array_equal(first, MinHasher(64, seed=6).signatures(sets))
    code = (
        "from utils.minhash_lsh import MinHasher, shingles\n"
        f"s = [shingles(t) for t in {[COURAGE_TELL, FRANCE, PRIMES]!r}]\n"
        "print(MinHasher(64, seed=5).signatures(s).tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(first.tolist())


def test_leakage_check_counts_test_texts_close_to_train():
    report = leakage_check([COURAGE_TELL, PRIMES], [COURAGE_GIVE, FRANCE])
    assert (report.n_test, report.n_leaked, report.rate) == (2, 1, 0.5)
    assert report.leaked_test_indices == [0]
    assert report.examples == [(COURAGE_GIVE, COURAGE_TELL, pytest.approx(28 / 36))]
    exact = leakage_check([PRIMES, FRANCE], ["What is the capital of France"])
    assert exact.examples == [("What is the capital of France", FRANCE, 1.0)]
    with pytest.raises(ValueError, match="test_texts is empty"):
        leakage_check([FRANCE], [])


def test_split_is_leak_free_keeps_groups_whole_and_is_deterministic():
    rng = random.Random(7)
    vocab = _vocabulary(rng)
    texts = [" ".join(rng.choice(vocab) for _ in range(10)) for _ in range(120)]
    for t in texts[:30]:  # 30 near-duplicate pairs
        texts.append(t.replace(t.split()[0], "qqq", 1))
    items = [{"id": i, "instruction": t} for i, t in enumerate(texts)]

    train, test = split_train_test(items, test_fraction=0.2, seed=11, key="instruction")
    assert len(train) + len(test) == len(items) and len(test) == 30
    assert [r["id"] for r in train] == sorted(r["id"] for r in train)  # input order kept
    train_sets = [shingles(r["instruction"]) for r in train]
    for r in test:  # exhaustive exact check, independent of MinHash
        s = shingles(r["instruction"])
        assert max(jaccard(s, t) for t in train_sets) < 0.7
    assert split_train_test(items, test_fraction=0.2, seed=11, key="instruction") == (train, test)
    assert split_train_test(items, test_fraction=0.2, seed=12, key="instruction")[1] != test

    plan = plan_split(texts, n_test=30, seed=11)
    assert plan.test_indices == [r["id"] for r in test]
    assert plan.n_groups == 30 and plan.n_grouped == 60
    assert plan.leakage.n_leaked == 0 and plan.leakage.n_test == 30


def test_split_keeps_a_transitive_chain_on_one_side():
    others = [f"unrelated sentence number {w}" for w in ("one", "two", "three", "four", "five")]
    texts = [A, B, C, *others]
    for seed in range(6):
        plan = plan_split(texts, n_test=3, seed=seed, config=WORDSET)
        side = {i: i in plan.test_indices for i in (0, 1, 2)}
        assert len(set(side.values())) == 1, seed  # A-B-C never split apart
        assert len(plan.test_indices) == 3


def test_split_argument_errors():
    with pytest.raises(ValueError, match="exactly one of test_fraction and n_test"):
        split_train_test(["a", "b"])
    with pytest.raises(ValueError, match="exactly one of test_fraction and n_test"):
        split_train_test(["a", "b"], test_fraction=0.5, n_test=1)
    with pytest.raises(ValueError, match=r"n_test must be in \[1, 2\] for 3 items, got 3"):
        split_train_test(["a", "b", "c"], n_test=3)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        split_train_test(["a", "b"], test_fraction=1.0)
