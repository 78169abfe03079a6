"""A labelled check set for the base-model critic, built from VERIFIABLE cases only.

Every label is right by construction, so the critic's accuracy on it is a measurement, not an
opinion:

* pair cases: one instruction, a response that follows it and a corrupted one that differs
  only in the checked property ("Answer in all capital letters" with "MANGO" vs "mango";
  exactly 3 bullets vs 5; valid vs broken JSON; 7 + 5 = 12 vs 13; ...). Format cases carry the
  ``utils.verifiable_checks`` checker that decides them (the good response passes, the bad one
  fails); arithmetic and topic cases carry the facts that decide them.
* instruction cases: clear, complete instructions vs corrupted ones (cut off mid-sentence,
  shuffled word salad, a bare number, a response posing as an instruction).

Cases are generated from templates with a seeded ``random.Random`` (same seed, same cases, same
ids) and split, per kind, into a ``dev`` part (for choosing the prompt and thresholds) and a
``test`` part (for the reported accuracy). Topics avoid the critic's own demonstrations
(``utils.critic_prompts.PAIR_SHOTS``/``INSTRUCTION_SHOTS``).

Also the metrics the evaluation reports: pairwise accuracy, both-orders consistency (pairwise
judge only), accuracy at a confidence threshold with its coverage, the distribution of soft
labels and the dev-chosen confidence threshold, instruction-judge accuracy and ROC AUC. Pure
Python: no model, no torch.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from utils.stats import wilson_interval

DEFAULT_SEED = 0
DEFAULT_DEV_FRACTION = 0.3
PAIRS_PER_KIND = 6
GOOD_INSTRUCTIONS_PER_TEMPLATE = 6
CORRUPTIONS_PER_KIND = 6

# Content tables: small, unambiguous facts.
FRUITS = ("banana", "cherry", "mango", "peach", "plum", "grape", "lemon", "pear")
FRUIT_COLORS = {
    "banana": "yellow", "cherry": "red", "mango": "orange", "peach": "orange",
    "plum": "purple", "grape": "green", "lemon": "yellow", "pear": "green",
}  # fmt: skip
ANIMALS = {  # animal: (where it lives, what it eats)
    "horse": ("fields", "grass and hay"),
    "rabbit": ("burrows", "grass and clover"),
    "tiger": ("forests", "deer and wild pigs"),
    "eagle": ("mountains", "fish and small mammals"),
    "dolphin": ("the sea", "fish and squid"),
    "camel": ("deserts", "dry plants and thorny shrubs"),
    "turtle": ("ponds", "plants and insects"),
    "wolf": ("forests", "deer and rabbits"),
}
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
}  # fmt: skip
VEGETABLES = ("carrot", "potato", "onion", "cabbage", "spinach", "pea")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": FRUITS,
    "animal": tuple(ANIMALS),
    "vegetable": VEGETABLES,
    "country": tuple(CAPITALS),
}
PLURALS = {
    "fruit": "fruits",
    "animal": "animals",
    "vegetable": "vegetables",
    "country": "countries",
}
KEYWORDS = ("strong", "wild", "quiet", "clever", "beautiful", "patient")


def _case_id(prefix: str, kind: str, payload: Mapping[str, Any]) -> str:
    # Content-derived: the same case always gets the same id, whatever else the set holds.
    h = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
    return f"{prefix}-{kind}-{h}"


def _check(instruction_id: str, **kwargs: Any) -> dict[str, Any]:
    return {"instruction_id": instruction_id, "kwargs": kwargs}


# --------------------------------------------------------------------------------------------
# Pair cases: each maker returns (instruction, good, bad, check, facts).


def _sentence_about_capital(country: str) -> str:
    return f"The capital of {country} is {CAPITALS[country]}."


def _pair_uppercase(rng: random.Random) -> tuple:
    if rng.random() < 0.5:
        fruit = rng.choice(FRUITS)
        return ("Answer in all capital letters: name a fruit.", fruit.upper(), fruit,
                _check("change_case:english_capital"), {})  # fmt: skip
    country = rng.choice(sorted(CAPITALS))
    s = _sentence_about_capital(country)
    return (f"Answer in all capital letters: what is the capital of {country}?", s.upper(), s,
            _check("change_case:english_capital"), {})  # fmt: skip


def _pair_lowercase(rng: random.Random) -> tuple:
    country = rng.choice(sorted(CAPITALS))
    s = _sentence_about_capital(country)
    return (
        f"Write your whole answer in lowercase letters: what is the capital of {country}?",
        s.lower(),
        s.title(),
        _check("change_case:english_lowercase"),
        {},
    )


def _pair_bullets(rng: random.Random) -> tuple:
    category = rng.choice(["fruit", "animal", "vegetable"])
    n = rng.choice([2, 3, 4])
    m = n + 2
    items = rng.sample(CATEGORIES[category], m)
    bullets = [f"- {x.capitalize()}" for x in items]
    return (
        f"List exactly {n} {PLURALS[category]} as markdown bullet points.",
        "\n".join(bullets[:n]),
        "\n".join(bullets),
        _check("detectable_format:number_bullet_lists", num_bullets=n),
        {},
    )


def _pair_one_word(rng: random.Random) -> tuple:
    country = rng.choice(sorted(CAPITALS))
    capital = CAPITALS[country]
    return (
        f"Answer with one word only: what is the capital of {country}?",
        capital,
        f"The capital city of {country} is {capital}, which is also one of its best known cities.",
        _check("length_constraints:one_word"),
        {},
    )


def _pair_arithmetic(rng: random.Random) -> tuple:
    a, b = rng.randint(2, 19), rng.randint(2, 19)
    op = rng.choice(["+", "*"])
    answer = a + b if op == "+" else a * b
    wrong = answer + rng.choice([-2, -1, 1, 2])
    words = {"+": "plus", "*": "times"}[op]
    if rng.random() < 0.5:
        ins, good, bad = f"What is {a} {op} {b}?", str(answer), str(wrong)
    else:
        ins = f"What is {a} {words} {b}? Answer with a short sentence."
        good, bad = f"{a} {words} {b} is {answer}.", f"{a} {words} {b} is {wrong}."
    return ins, good, bad, None, {"a": a, "b": b, "op": op, "answer": answer, "wrong": wrong}


def _pair_json(rng: random.Random) -> tuple:
    fruit = rng.choice(FRUITS)
    obj = {"name": fruit, "color": FRUIT_COLORS[fruit]}
    good = json.dumps(obj)
    broken = rng.choice(
        [
            good[:-1],  # missing closing brace
            good.replace('"', "'"),  # single quotes are not JSON
            f"name: {fruit}, color: {FRUIT_COLORS[fruit]}",  # no object at all
        ]
    )
    return (
        f'Reply with only a JSON object with the keys "name" and "color" describing a {fruit}.',
        good,
        broken,
        _check("detectable_format:json_format", keys=["name", "color"]),
        {},
    )


def _pair_no_comma(rng: random.Random) -> tuple:
    animal = rng.choice(sorted(ANIMALS))
    home, food = ANIMALS[animal]
    food_a, food_b = food.split(" and ")
    return (
        f"Without using any commas, describe a {animal} in one sentence.",
        f"A {animal} is an animal that lives in {home} and eats {food_a} and {food_b}.",
        f"A {animal} is an animal that lives in {home}, eats {food_a}, and also eats {food_b}.",
        _check("punctuation:no_comma"),
        {},
    )


def _pair_word_limit(rng: random.Random) -> tuple:
    animal = rng.choice(sorted(ANIMALS))
    home, food = ANIMALS[animal]
    return (
        f"In fewer than 8 words, say what a {animal} eats.",
        f"A {animal} eats {food}.",
        f"A {animal} is an animal that usually lives in {home}, and when it is hungry it "
        f"looks for {food}, which it eats every day.",
        _check("length_constraints:number_words", num_words=8, relation="less than"),
        {},
    )


def _pair_keyword(rng: random.Random) -> tuple:
    animal = rng.choice(sorted(ANIMALS))
    word = rng.choice(KEYWORDS)
    home, _ = ANIMALS[animal]
    return (
        f'Describe a {animal} in one sentence and include the word "{word}".',
        f"A {animal} is a {word} animal that lives in {home}.",
        f"A {animal} is an animal that lives in {home}.",
        _check("keywords:existence", keywords=[word]),
        {},
    )


def _pair_forbidden(rng: random.Random) -> tuple:
    animal = rng.choice(sorted(ANIMALS))
    _, food = ANIMALS[animal]
    return (
        f'Say what a {animal} eats without using the word "food".',
        f"A {animal} eats {food}.",
        f"The food of a {animal} is mostly {food}.",
        _check("keywords:forbidden_words", forbidden_words=["food"]),
        {},
    )


def _pair_quotation(rng: random.Random) -> tuple:
    country = rng.choice(sorted(CAPITALS))
    s = _sentence_about_capital(country)
    return (
        f"Wrap your whole answer in double quotation marks: what is the capital of {country}?",
        f'"{s}"',
        s,
        _check("startend:quotation"),
        {},
    )


def _pair_relevance(rng: random.Random) -> tuple:
    category, other = rng.sample(["fruit", "animal", "vegetable"], 2)
    good = rng.choice(CATEGORIES[category]).capitalize() + "."
    bad = rng.choice(CATEGORIES[other]).capitalize() + "."
    return (f"Name a {category}.", good, bad, None,
            {"category": category, "good_item": good, "bad_item": bad})  # fmt: skip


PAIR_KINDS: dict[str, Callable[[random.Random], tuple]] = {
    "uppercase": _pair_uppercase,
    "lowercase": _pair_lowercase,
    "bullets": _pair_bullets,
    "one_word": _pair_one_word,
    "arithmetic": _pair_arithmetic,
    "json": _pair_json,
    "no_comma": _pair_no_comma,
    "word_limit": _pair_word_limit,
    "keyword": _pair_keyword,
    "forbidden_word": _pair_forbidden,
    "quotation": _pair_quotation,
    "relevance": _pair_relevance,
}


def build_pair_cases(seed: int = DEFAULT_SEED, per_kind: int = PAIRS_PER_KIND) -> list[dict]:
    """``per_kind`` distinct cases of every kind in ``PAIR_KINDS`` (good and bad responses)."""
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    cases = []
    for kind, make in PAIR_KINDS.items():
        rng = random.Random(f"{seed}:pair:{kind}")  # a kind's cases do not depend on the others
        seen: set[str] = set()
        tries = 0
        while len(seen) < per_kind:
            tries += 1
            if tries > 200 * per_kind:
                raise ValueError(f"cannot draw {per_kind} distinct {kind!r} cases")
            instruction, good, bad, check, facts = make(rng)
            key = json.dumps([instruction, good, bad])
            if key in seen or good == bad:
                continue
            seen.add(key)
            payload = {"instruction": instruction, "good": good, "bad": bad}
            cases.append(
                {
                    "id": _case_id("pair", kind, payload),
                    "kind": kind,
                    **payload,
                    "check": check,
                    "facts": facts,
                }
            )
    return cases


# --------------------------------------------------------------------------------------------
# Instruction cases.

ACTIVITIES = (
    "training a puppy", "packing for a camping trip", "growing tomatoes",
    "saving money on groceries", "writing a cover letter", "remembering names",
)  # fmt: skip
PHENOMENA = (
    "leaves change colour in autumn", "ice floats on water", "metal feels cold to the touch",
    "onions make people cry", "the ocean has tides", "bread rises in the oven",
)  # fmt: skip
POEM_TOPICS = (
    "a lost umbrella", "a sleepy dragon", "the first snow of winter", "a paper boat",
    "a busy ant", "a foggy morning",
)  # fmt: skip
GOOD_TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Give three tips for {x}.", ACTIVITIES),
    ("Explain why {x}.", PHENOMENA),
    ("Write a short poem about {x}.", POEM_TOPICS),
    ("What is the capital of {x}?", tuple(CAPITALS)),
)
# A cut after one of these words leaves the sentence visibly unfinished.
_DANGLING = frozenset({"the", "a", "an", "of", "for", "about", "why", "is", "to", "in", "on"})
CORRUPTIONS = ("truncated", "word_salad", "bare_number", "response_like")


def good_instructions() -> list[str]:
    out = []
    for template, fillers in GOOD_TEMPLATES:
        out.extend(template.format(x=x) for x in fillers[:GOOD_INSTRUCTIONS_PER_TEMPLATE])
    return out


def truncate_instruction(instruction: str) -> str:
    """The instruction cut right after its last dangling function word ("Give three tips for")."""
    words = instruction.rstrip(".?!").split()
    cuts = [i for i, w in enumerate(words[:-1]) if w.lower() in _DANGLING and i >= 1]
    if not cuts:
        raise ValueError(f"no dangling cut point in {instruction!r}")
    return " ".join(words[: cuts[-1] + 1])


def word_salad(instruction: str, rng: random.Random) -> str:
    words = [w.strip(".?!,").lower() for w in instruction.split()]
    shuffled = words[:]
    for _ in range(100):
        rng.shuffle(shuffled)
        # Different from the original order and not starting with its first word.
        if shuffled != words and shuffled[0] != words[0]:
            return " ".join(shuffled)
    raise ValueError(f"cannot shuffle {instruction!r}")


def response_like(rng: random.Random) -> str:
    choice = rng.randrange(3)
    if choice == 0:
        country = rng.choice(sorted(CAPITALS))
        return f"The capital of {country} is {CAPITALS[country]}."
    if choice == 1:
        return (
            f"Sure! Here are three tips for {rng.choice(ACTIVITIES)}: start early, stay patient "
            "and ask for help."
        )
    return f"Here is a short poem about {rng.choice(POEM_TOPICS)}: it drifts and sings all day."


def build_instruction_cases(
    seed: int = DEFAULT_SEED, per_corruption: int = CORRUPTIONS_PER_KIND
) -> list[dict]:
    """Good instructions (label True) and the same number of corrupted ones (label False)."""
    good = good_instructions()
    cases = [
        {"id": _case_id("ins", "good", {"i": g}), "kind": "good", "instruction": g, "label": True}
        for g in good
    ]
    for kind in CORRUPTIONS:
        rng = random.Random(f"{seed}:instruction:{kind}")
        seen: set[str] = set()
        tries = 0
        while len(seen) < per_corruption:
            tries += 1
            if tries > 200 * per_corruption:
                raise ValueError(f"cannot draw {per_corruption} distinct {kind!r} cases")
            source = rng.choice(good)
            if kind == "truncated":
                text = truncate_instruction(source)
            elif kind == "word_salad":
                text = word_salad(source, rng)
            elif kind == "bare_number":
                text = str(rng.randint(10, 9999))
            else:
                text = response_like(rng)
            if text in seen or text in good:
                continue
            seen.add(text)
            cases.append(
                {
                    "id": _case_id("ins", kind, {"i": text}),
                    "kind": kind,
                    "instruction": text,
                    "label": False,
                }
            )
    return cases


def assign_splits(
    cases: Sequence[Mapping[str, Any]], dev_fraction: float, seed: int
) -> list[dict[str, Any]]:
    """Copies of ``cases`` with ``split`` = "dev" or "test", stratified by ``kind`` (seeded)."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be strictly between 0 and 1, got {dev_fraction}")
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(cases):
        by_kind[c["kind"]].append(i)
    dev: set[int] = set()
    for kind in sorted(by_kind):
        idx = sorted(by_kind[kind], key=lambda i: cases[i]["id"])
        random.Random(f"{seed}:split:{kind}").shuffle(idx)
        n_dev = max(1, round(dev_fraction * len(idx))) if len(idx) > 1 else 0
        dev.update(idx[:n_dev])
    return [{**c, "split": "dev" if i in dev else "test"} for i, c in enumerate(cases)]


def build_checkset(
    seed: int = DEFAULT_SEED, dev_fraction: float = DEFAULT_DEV_FRACTION
) -> dict[str, Any]:
    """The whole check set: pair and instruction cases with dev/test splits and a content hash."""
    pairs = assign_splits(build_pair_cases(seed), dev_fraction, seed)
    instructions = assign_splits(build_instruction_cases(seed), dev_fraction, seed)
    body = {"pairs": pairs, "instructions": instructions}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"seed": seed, "dev_fraction": dev_fraction, "sha256": digest, **body}


# --------------------------------------------------------------------------------------------
# Metrics (pure).


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counted one half (the Mann-Whitney U statistic divided by n_pos * n_neg)."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        raise ValueError(f"AUC needs both classes: {len(pos)} positive, {len(neg)} negative")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _rate(successes: int, n: int) -> dict[str, Any]:
    if n == 0:
        return {"n": 0, "successes": 0, "rate": None, "ci_low": None, "ci_high": None}
    lo, hi = wilson_interval(successes, n)
    return {"n": n, "successes": successes, "rate": successes / n, "ci_low": lo, "ci_high": hi}


def pair_metrics(
    p_good: Sequence[float],
    consistent: Sequence[bool | None],
    thresholds: Sequence[float] = (0.6, 0.7, 0.8, 0.9),
) -> dict[str, Any]:
    """Metrics for pair cases whose correct answer is the good response.

    ``p_good`` is the critic's soft preference for the good response; a case is correct when
    p_good > 0.5 (a tie is wrong: the judge did not choose). At threshold t a case is covered
    when max(p_good, 1 - p_good) >= t, and the covered cases' accuracy is what a pair filter
    at t would keep. ``consistent`` is None where it does not apply (the pointwise judge shows
    no order); consistency rates count only the cases where it applies (n=0: rate None)."""
    if len(p_good) != len(consistent):
        raise ValueError(f"{len(p_good)} preferences for {len(consistent)} consistency flags")
    if not p_good:
        raise ValueError("no pair results to score")
    n = len(p_good)
    correct = [p > 0.5 for p in p_good]
    applies = [(c, k) for c, k in zip(consistent, correct, strict=True) if c is not None]
    out: dict[str, Any] = {
        "accuracy": _rate(sum(correct), n),
        "position_consistency": _rate(sum(bool(c) for c, _ in applies), len(applies)),
        "consistent_and_correct": _rate(sum(bool(c) and k for c, k in applies), len(applies)),
        "mean_p_good": sum(p_good) / n,
        "at_threshold": {},
    }
    for t in thresholds:
        covered = [k for p, k in zip(p_good, correct, strict=True) if max(p, 1 - p) >= t]
        out["at_threshold"][f"{t:g}"] = {
            "coverage": len(covered) / n,
            "accuracy": _rate(sum(covered), len(covered)),
        }
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default): position q * (n - 1) in sorted order."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def soft_label_distribution(p_good: Sequence[float]) -> dict[str, Any]:
    """How confident the pair judge is: the soft label a pair would get, max(p, 1 - p) in
    [0.5, 1], summarised by quantiles and a 0.05-wide histogram. This is what a
    ``pair_confidence_threshold`` cuts."""
    from utils.soft_label_summary import histogram

    if not p_good:
        raise ValueError("no soft labels to summarise")
    conf = [max(p, 1.0 - p) for p in p_good]
    return {
        "n": len(conf),
        "mean": sum(conf) / len(conf),
        "quantiles": {
            name: quantile(conf, q)
            for name, q in (
                ("min", 0.0),
                ("p10", 0.1),
                ("p25", 0.25),
                ("p50", 0.5),
                ("p75", 0.75),
                ("p90", 0.9),
                ("max", 1.0),
            )
        },  # fmt: skip
        "histogram": histogram(conf),
    }


def choose_confidence_threshold(
    p_good: Sequence[float],
    grid: Sequence[float],
    min_accuracy: float = 0.75,
    min_covered: int = 5,
) -> dict[str, Any]:
    """The smallest threshold in ``grid`` whose covered cases (soft label >= t) are right at
    least ``min_accuracy`` of the time, with at least ``min_covered`` such cases, so that the
    kept pairs' labels are mostly right while keeping as many pairs as possible. Meant for
    DEV verdicts only. ``threshold`` is None when no grid value qualifies."""
    if not 0.5 <= min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy must be in [0.5, 1], got {min_accuracy}")
    if not p_good:
        raise ValueError("no soft labels to choose a threshold from")
    table = []
    chosen = None
    for t in sorted(grid):
        if not 0.5 <= t <= 1.0:
            raise ValueError(f"threshold {t} outside [0.5, 1]")
        covered = [p > 0.5 for p in p_good if max(p, 1.0 - p) >= t and p != 0.5]
        acc = sum(covered) / len(covered) if covered else None
        ok = len(covered) >= min_covered and acc is not None and acc >= min_accuracy
        table.append({"threshold": t, "covered": len(covered), "accuracy": acc, "qualifies": ok})
        if ok and chosen is None:
            chosen = t
    return {
        "threshold": chosen,
        "rule": f"smallest t with accuracy >= {min_accuracy} on >= {min_covered} covered cases",
        "table": table,
    }


def best_threshold(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The threshold (predict positive when score >= t) with the best accuracy on these cases;
    among ties, the one closest to 0.5. Candidates: 0.5 and midpoints between sorted scores."""
    if len(scores) != len(labels) or not scores:
        raise ValueError(
            f"need equally many scores and labels, got {len(scores)} and {len(labels)}"
        )
    s = sorted(set(scores))
    candidates = {0.5, s[0] - 1e-9, s[-1] + 1e-9}
    candidates.update((a + b) / 2 for a, b in zip(s, s[1:], strict=False))

    def acc(t: float) -> int:
        return sum((x >= t) == bool(y) for x, y in zip(scores, labels, strict=True))

    return max(sorted(candidates), key=lambda t: (acc(t), -abs(t - 0.5)))


def instruction_metrics(
    scores: Sequence[float], labels: Sequence[bool], threshold: float
) -> dict[str, Any]:
    """Accuracy (Wilson CI) at ``threshold``, per-class recall and AUC of the instruction judge."""
    if len(scores) != len(labels) or not scores:
        raise ValueError(
            f"need equally many scores and labels, got {len(scores)} and {len(labels)}"
        )
    pred = [s >= threshold for s in scores]
    correct = [p == bool(y) for p, y in zip(pred, labels, strict=True)]
    pos = [c for c, y in zip(correct, labels, strict=True) if y]
    neg = [c for c, y in zip(correct, labels, strict=True) if not y]
    out = {
        "threshold": threshold,
        "accuracy": _rate(sum(correct), len(correct)),
        "recall_good": _rate(sum(pos), len(pos)),
        "recall_bad": _rate(sum(neg), len(neg)),
        "auc": roc_auc(scores, labels) if pos and neg else None,
    }
    return out


# --------------------------------------------------------------------------------------------
# Running the critic on the check set, choosing on dev, reporting on test.

REPORT_THRESHOLDS = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)
THRESHOLD_GRID = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def split_cases(cases: Sequence[Mapping[str, Any]], split: str) -> list[Mapping[str, Any]]:
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    return [c for c in cases if c["split"] == split]


def score_pair_cases(lm: Any, cases: Sequence[Mapping[str, Any]], cfg: Any) -> list[dict[str, Any]]:
    """The pair judge's verdict on each case, in the configured ``pair_mode``.

    Passed as (instruction, good, bad), so ``p_first`` is the preference for the good
    response: the pairwise judge asks both orders, the pointwise judge shows no order."""
    from utils.critic import compare_pairs

    res = compare_pairs(lm, [(c["instruction"], c["good"], c["bad"]) for c in cases], cfg)
    return [
        {"id": c["id"], "kind": c["kind"], "split": c["split"], **r}
        for c, r in zip(cases, res, strict=True)
    ]


def score_instruction_cases(
    lm: Any, cases: Sequence[Mapping[str, Any]], cfg: Any
) -> list[dict[str, Any]]:
    """The instruction judge's verdict on each case."""
    from utils.critic import judge_instructions

    res = judge_instructions(lm, [c["instruction"] for c in cases], cfg)
    return [
        {"id": c["id"], "kind": c["kind"], "split": c["split"], "label": c["label"], **r}
        for c, r in zip(cases, res, strict=True)
    ]


def pair_split_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pair metrics of one split's verdicts plus the soft-label distribution; ``mean_p_a``
    (0.5 = no position bias) for the pairwise judge, None for the pointwise one."""
    m = pair_metrics(
        [r["p_first"] for r in rows],
        [r["position_consistent"] for r in rows],
        REPORT_THRESHOLDS,
    )
    with_a = [r["p_a_mean"] for r in rows if "p_a_mean" in r]
    m["mean_p_a"] = sum(with_a) / len(with_a) if with_a else None
    m["soft_labels"] = soft_label_distribution([r["p_first"] for r in rows])
    return m


def instruction_judge_metrics(
    dev_rows: Sequence[Mapping[str, Any]], test_rows: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Dev (and, when given, test) metrics of the instruction judge with the threshold chosen
    on DEV only; ``test`` is None without test rows."""
    threshold = best_threshold([r["score"] for r in dev_rows], [r["label"] for r in dev_rows])
    out: dict[str, Any] = {"test": None}
    for split, rows in (("dev", dev_rows), ("test", test_rows)):
        if rows is not None:
            out[split] = instruction_metrics(
                [r["score"] for r in rows], [r["label"] for r in rows], threshold
            )
    return out


def choose_variant(dev_metrics: Mapping[Any, Mapping[str, Any]], judge: str) -> Any:
    """The variant to report, chosen on DEV metrics only. ``dev_metrics`` maps a variant key to
    its dev metrics (``pair_split_metrics`` for "pairs", ``instruction_metrics`` for
    "instructions"), listed cheapest first. Pairs: accuracy, then both-orders consistency
    (pairwise only), then mean P(good); instructions: AUC. Ties go to the first listed."""
    if judge == "pairs":

        def key(v: Any) -> tuple:
            m = dev_metrics[v]
            cons = m["position_consistency"]["rate"]
            return (m["accuracy"]["rate"], cons if cons is not None else 0.0,
                    m.get("mean_p_good", 0.0))  # fmt: skip

    elif judge == "instructions":

        def key(v: Any) -> tuple:
            return (dev_metrics[v]["auc"],)

    else:
        raise ValueError(f"judge must be 'pairs' or 'instructions', got {judge!r}")
    if not dev_metrics:
        raise ValueError("no variants to choose from")
    best = None
    for v in dev_metrics:  # strict > keeps the first (cheapest) among ties
        if best is None or key(v) > key(best):
            best = v
    return best


def per_kind_accuracy(rows: Sequence[Mapping[str, Any]], split: str) -> dict[str, dict]:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for r in split_cases(rows, split):
        by_kind[r["kind"]].append(r["p_first"] > 0.5)
    return {k: _rate(sum(v), len(v)) for k, v in sorted(by_kind.items())}
