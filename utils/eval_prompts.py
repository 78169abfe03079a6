"""The held-out evaluation set: base tasks combined with verifiable constraints, plus ICL demos.

``build_eval_set`` draws, from a seeded ``random.Random`` only, several hundred prompts such as
"Describe the ocean. Your entire answer must be in lowercase letters." Each prompt carries 1
(sometimes 2 compatible) constraints from ``utils.verifiable_checks.INSTRUCTION_TYPES``, whose
checkers alone decide success. Types are balanced: each prompt takes the least-used types so
far, so every type appears in about the same number of prompts. ``icl_examples`` are
hand-written demonstrations for the in-context arm, on other topics and with other constraint
values than the eval set, so that arm is not shown answers to its own test.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from utils.verifiable_checks import (
    CONFLICTS,
    EXCLUSIVE_TYPES,
    INSTRUCTION_TYPES,
    check_instruction,
    check_instruction_loose,
    compatible,
    describe,
)

# Base tasks written for this project: short, answerable in ~40 words, no commas (so the
# repeated request of combination:repeat_prompt never fights punctuation:no_comma), and no
# overlap with the ICL topics below.
TASKS: tuple[str, ...] = (
    "Describe the ocean.",
    "Give advice to a new student.",
    "Explain why the sky is blue.",
    "Describe your ideal weekend.",
    "Explain how plants grow.",
    "Give tips for sleeping well.",
    "Describe a busy city street.",
    "Explain why exercise is healthy.",
    "Write a short note to a friend who is moving away.",
    "Describe a rainy day.",
    "Explain how a bicycle works.",
    "Give advice to someone learning to cook.",
    "Describe the moon.",
    "Explain why people keep pets.",
    "Write a short welcome message for a library.",
    "Describe a forest in autumn.",
    "Explain what a rainbow is.",
    "Give advice for a job interview.",
    "Describe a good teacher.",
    "Explain why reading is useful.",
    "Describe a market on a Saturday morning.",
    "Explain how bees make honey.",
    "Give tips for staying focused while studying.",
    "Describe the desert at noon.",
    "Explain why we need sleep.",
    "Write a thank-you note to a neighbor.",
    "Describe a snowy mountain.",
    "Explain how rain forms.",
    "Give advice to someone starting a vegetable garden.",
    "Describe a train journey through the countryside.",
    "Explain why recycling matters.",
    "Describe your favorite meal.",
    "Explain how the human heart works.",
    "Give tips for saving energy at home.",
    "Describe a summer festival.",
    "Explain why friendship is valuable.",
    "Write a short product description for a water bottle.",
    "Describe an old castle.",
    "Explain how birds fly.",
    "Give advice to a new runner.",
    "Describe a quiet beach at sunrise.",
    "Explain why the seasons change.",
    "Describe a thunderstorm.",
    "Explain how a rocket reaches space.",
    "Give tips for learning a new language.",
    "Describe a crowded train station.",
    "Explain why clean water matters for health.",
    "Describe a sleepy cat.",
    "Explain what a computer does.",
    "Give advice for a first day at work.",
    "Describe a mountain lake.",
    "Explain why trees matter for the planet.",
    "Write a short review of a pizza restaurant.",
    "Describe a winter morning.",
    "Explain how the internet works.",
    "Give tips for keeping a room tidy.",
    "Describe a farm in spring.",
    "Explain why the sea is salty.",
    "Describe a visit to an art museum.",
    "Explain how a camera takes a photo.",
    "Give advice to a young musician.",
    "Describe a river in the evening.",
    "Explain why people enjoy traveling.",
    "Write a short message to cheer up a sad friend.",
    "Describe a night sky full of stars.",
    "Explain what clouds are made of.",
    "Give tips for a long car trip.",
    "Describe a playground after school.",
    "Explain why the sun feels hot.",
    "Describe the perfect cup of tea.",
    "Explain how fish breathe underwater.",
    "Give advice for making new friends.",
)

DEFAULT_N = 320
DEFAULT_SEED = 1234
# Share of prompts that carry a second, compatible constraint.
PAIR_FRACTION = 0.35


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _record_id(prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[Mapping]) -> str:
    # The id is a function of the content alone, so it is stable across runs and orderings.
    payload = _canonical_json(
        {"prompt": prompt, "instruction_ids": list(instruction_ids), "kwargs": list(kwargs)}
    )
    return "ve-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _least_used(candidates: Sequence[str], counts: Counter, rng: random.Random) -> str:
    low = min(counts[c] for c in candidates)
    return rng.choice(sorted(c for c in candidates if counts[c] == low))


def _partners(type_id: str) -> list[str]:
    return [
        t for t in INSTRUCTION_TYPES if t != type_id and frozenset((t, type_id)) not in CONFLICTS
    ]


def build_eval_set(n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> list[dict]:
    """``n`` evaluation prompt records, identical for identical (n, seed).

    A record is ``{"id", "prompt", "instruction_ids", "kwargs", "type"}``; ``type`` is the
    primary (first) instruction id; ``kwargs[i]`` are the checker kwargs of
    ``instruction_ids[i]``. Prompts are unique; no record combines conflicting types.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    max_unique = len(TASKS) * len(INSTRUCTION_TYPES)
    if n > max_unique:
        raise ValueError(f"n={n} exceeds the {max_unique} prompts this pool can make uniquely")
    rng = random.Random(seed)
    types = sorted(INSTRUCTION_TYPES)
    pairable = [t for t in types if t not in EXCLUSIVE_TYPES and _partners(t)]
    counts: Counter = Counter({t: 0 for t in types})
    task_order: list[str] = []
    records: list[dict] = []
    seen_prompts: set[str] = set()
    while len(records) < n:
        paired = rng.random() < PAIR_FRACTION
        primary = _least_used(pairable if paired else types, counts, rng)
        chosen = [primary]
        if paired:
            chosen.append(_least_used(_partners(primary), counts, rng))
        for _attempt in range(100):
            if not task_order:
                # Tasks are dealt in shuffled rounds so each is used about equally often.
                task_order = list(TASKS)
                rng.shuffle(task_order)
            task = task_order.pop()
            kwargs = [INSTRUCTION_TYPES[t].sample_kwargs(rng, task) for t in chosen]
            sentences = [
                describe(t, kw, rng.randrange(len(INSTRUCTION_TYPES[t].templates)))
                for t, kw in zip(chosen, kwargs, strict=True)
            ]
            prompt = " ".join([task, *sentences])
            if prompt not in seen_prompts:
                break
        else:  # pragma: no cover - the pool is far larger than n allows to exhaust
            raise RuntimeError(f"could not draw a new unique prompt for types {chosen}")
        seen_prompts.add(prompt)
        counts.update(chosen)
        records.append(
            {
                "id": _record_id(prompt, chosen, kwargs),
                "prompt": prompt,
                "instruction_ids": chosen,
                "kwargs": kwargs,
                "type": primary,
            }
        )
    return records


def prompt_set_hash(records: Sequence[Mapping[str, Any]]) -> str:
    """sha256 hex of the records' canonical JSON (sorted keys, no spaces, UTF-8)."""
    return hashlib.sha256(_canonical_json(list(records)).encode("utf-8")).hexdigest()


def type_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Number of prompts containing each instruction type (primary or second)."""
    counts = Counter(t for r in records for t in r["instruction_ids"])
    return {t: counts.get(t, 0) for t in sorted(INSTRUCTION_TYPES)}


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError naming the problem when ``record`` is not a well-formed eval record."""
    for field in ("id", "prompt", "instruction_ids", "kwargs"):
        if field not in record:
            raise ValueError(f"eval record {record.get('id', '?')!r} lacks field {field!r}")
    ids, kwargs = record["instruction_ids"], record["kwargs"]
    if isinstance(ids, str) or not ids or len(ids) != len(kwargs):
        raise ValueError(
            f"eval record {record['id']!r}: instruction_ids {ids!r} and kwargs {kwargs!r} "
            "must be non-empty lists of equal length"
        )
    if not compatible(ids):
        raise ValueError(f"eval record {record['id']!r}: conflicting instructions {ids!r}")


def score_response(record: Mapping[str, Any], response: str) -> dict:
    """IFEval strict and loose results of ``response`` to one eval ``record``.

    Returns ``{"id", "instruction_ids", "instruction_strict": [bool], "instruction_loose":
    [bool], "prompt_strict": bool, "prompt_loose": bool}``.
    """
    validate_record(record)
    strict = [
        check_instruction(i, response, kw)
        for i, kw in zip(record["instruction_ids"], record["kwargs"], strict=True)
    ]
    loose = [
        check_instruction_loose(i, response, kw)
        for i, kw in zip(record["instruction_ids"], record["kwargs"], strict=True)
    ]
    return {
        "id": record["id"],
        "instruction_ids": list(record["instruction_ids"]),
        "instruction_strict": strict,
        "instruction_loose": loose,
        "prompt_strict": all(strict),
        "prompt_loose": all(loose),
    }


# --------------------------------------------------------------------------------------------
# In-context demonstrations (URIAL-style arm). Topics are not in TASKS and every parameter
# value differs from the eval pools in utils.verifiable_checks (e.g. 12 words, 5 bullets,
# 4 placeholders, keys "animal"/"fact"), so the demos teach the format, not the answers.

ICL_RECORDS: tuple[dict, ...] = (
    {
        "task": "Describe a lighthouse at night.",
        "instruction": "Describe a lighthouse at night. Answer with at most 12 words.",
        "instruction_ids": ["length_constraints:number_words"],
        "kwargs": [{"num_words": 12, "relation": "at most"}],
        "response": "A tall white tower sweeping its bright beam across dark waves.",
    },
    {
        "task": "List ways to keep a houseplant alive.",
        "instruction": "List ways to keep a houseplant alive. Your answer must contain exactly "
        '5 bullet points. Use markdown bullet points such as "* This is a point".',
        "instruction_ids": ["detectable_format:number_bullet_lists"],
        "kwargs": [{"num_bullets": 5}],
        "response": "* Water it when the soil feels dry.\n* Give it bright indirect light.\n"
        "* Use a pot with drainage holes.\n* Wipe dust off the leaves.\n"
        "* Feed it once a month in summer.",
    },
    {
        "task": "Explain what a volcano is.",
        "instruction": "Explain what a volcano is. Your entire answer must be in lowercase "
        "letters. No capital letters are allowed. Do not use any commas in your answer.",
        "instruction_ids": ["change_case:english_lowercase", "punctuation:no_comma"],
        "kwargs": [{}, {}],
        "response": "a volcano is an opening in the earth's crust. melted rock called magma "
        "rises from deep below and bursts out as lava ash and gas.",
    },
    {
        "task": "Write a short note to a neighbor about a lost dog.",
        "instruction": "Write a short note to a neighbor about a lost dog. Include the "
        'keywords "garden" and "collar" in your answer.',
        "instruction_ids": ["keywords:existence"],
        "kwargs": [{"keywords": ["garden", "collar"]}],
        "response": "Hi! Our dog Max slipped out of the garden this morning. He is brown and "
        "wears a red collar. Please call us if you see him. Thank you!",
    },
    {
        "task": "Describe a penguin.",
        "instruction": "Describe a penguin. Wrap your entire answer in JSON format as an object "
        'with the keys "animal" and "fact".',
        "instruction_ids": ["detectable_format:json_format"],
        "kwargs": [{"keys": ["animal", "fact"]}],
        "response": '{"animal": "penguin", "fact": "Penguins are birds that cannot fly but '
        'swim fast in cold seas."}',
    },
    {
        "task": "Write a slogan for a bakery.",
        "instruction": "Write a slogan for a bakery. Your entire answer should be in English "
        "and in all capital letters.",
        "instruction_ids": ["change_case:english_capital"],
        "kwargs": [{}],
        "response": "FRESH BREAD EVERY MORNING, BAKED WITH LOVE!",
    },
    {
        "task": "Explain how a compass works.",
        "instruction": "Explain how a compass works. Finish your answer with the exact phrase "
        '"Safe travels!" and add nothing after it.',
        "instruction_ids": ["startend:end_checker"],
        "kwargs": [{"end_phrase": "Safe travels!"}],
        "response": "A compass has a small magnetized needle. It turns to line up with the "
        "Earth's magnetic field, so one end always points north. Safe travels!",
    },
    {
        "task": "Name the largest planet in our solar system.",
        "instruction": "Name the largest planet in our solar system. Answer with one word only.",
        "instruction_ids": ["length_constraints:one_word"],
        "kwargs": [{}],
        "response": "Jupiter",
    },
    {
        "task": "Write an invitation to a birthday party.",
        "instruction": "Write an invitation to a birthday party. Include at least 4 "
        "placeholders in square brackets like [name].",
        "instruction_ids": ["detectable_content:number_placeholders"],
        "kwargs": [{"num_placeholders": 4}],
        "response": "Dear [name], you are invited to my birthday party on [date] at [time]. "
        "It will be at [address]. Hope to see you there!",
    },
)


def icl_examples() -> list[tuple[str, str]]:
    """Hand-written (instruction, response) demonstrations that follow their constraints."""
    return [(r["instruction"], r["response"]) for r in ICL_RECORDS]
