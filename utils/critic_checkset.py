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

The critic's accuracy on these cases (metrics, the dev-chosen thresholds and variants) is
measured by ``utils.critic_calibration``. Pure Python: no model, no torch.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


def split_cases(cases: Sequence[Mapping[str, Any]], split: str) -> list[Mapping[str, Any]]:
    """The cases of one split, "dev" or "test", in their order."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    return [c for c in cases if c["split"] == split]
