"""Verifiable instructions: the instruction types (checker, phrasings, parameter sampler) and
IFEval scoring.

Every arm (base zero-shot, base + in-context examples, SFT, DPO, CAI) is scored by these
functions and nothing else: no length, judge or likelihood proxy that a base model can game.
The checkers themselves (pure functions, IFEval semantics, each deviation documented) are in
``utils.instruction_checkers``.

``INSTRUCTION_TYPES`` maps an instruction id (IFEval's id where IFEval has the type) to its
checker, description templates and parameter sampler. ``evaluate_strict`` / ``evaluate_loose``
are IFEval's ``test_instruction_following_strict`` / ``_loose``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from utils.instruction_checkers import (
    check_end_phrase,
    check_english_capital,
    check_english_lowercase,
    check_forbidden_words,
    check_json_format,
    check_keywords_existence,
    check_no_comma,
    check_number_bullets,
    check_number_highlights,
    check_number_paragraphs,
    check_number_placeholders,
    check_number_sentences,
    check_number_words,
    check_one_word,
    check_postscript,
    check_quotation,
    check_repeat_prompt,
    check_start_phrase,
    check_title,
)

# --------------------------------------------------------------------------------------------
# Parameter samplers: rng and the base task -> kwargs. Pools are the eval set's values; the
# in-context demonstrations (utils.eval_prompts.icl_examples) deliberately use other values.

WORD_BOUNDS: dict[str, tuple[int, ...]] = {
    "at most": (15, 20, 30, 40),
    "less than": (25, 35),
    "at least": (20, 30),
}
SENTENCE_BOUNDS: dict[str, tuple[int, ...]] = {
    "at most": (2, 3),
    "exactly": (2, 3),
    "at least": (3,),
}
NUM_PARAGRAPHS = (2, 3)
NUM_BULLETS = (2, 3, 4)
NUM_HIGHLIGHTS = (2, 3)
NUM_PLACEHOLDERS = (2, 3)
# Keyword and forbidden-word pools are disjoint, and no pool word occurs in a phrase below.
KEYWORDS = (
    "water", "friend", "simple", "light", "today", "future", "home", "music", "color",
    "morning", "journey", "careful", "balance", "patience", "window", "story",
)  # fmt: skip
FORBIDDEN_WORDS = (
    "very", "really", "good", "thing", "many", "also", "just", "always", "important", "people",
)  # fmt: skip
JSON_KEY_SETS: tuple[tuple[str, ...], ...] = (
    ("answer",),
    ("topic", "answer"),
    ("title", "summary"),
    ("main_point", "details"),
)
# No commas (compatible with no_comma) and no pool word inside.
START_PHRASES = ("Here is my answer:", "In short", "My reply is this:", "Let me explain.")
END_PHRASES = (
    "Is there anything else I can help with?",
    "Any other questions?",
    "That is all.",
    "Thank you for reading.",
)


def _mentions(text: str, word: str) -> bool:
    return re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE) is not None


def _sample_relation_count(bounds: Mapping[str, tuple[int, ...]], rng: random.Random):
    relation = rng.choice(sorted(bounds))
    return relation, rng.choice(bounds[relation])


def _sample_number_words(rng: random.Random, task: str) -> dict:
    relation, n = _sample_relation_count(WORD_BOUNDS, rng)
    return {"num_words": n, "relation": relation}


def _sample_number_sentences(rng: random.Random, task: str) -> dict:
    relation, n = _sample_relation_count(SENTENCE_BOUNDS, rng)
    return {"num_sentences": n, "relation": relation}


def _sample_keywords(rng: random.Random, task: str) -> dict:
    # A keyword already in the task would be satisfied by echoing the task.
    pool = [w for w in KEYWORDS if not _mentions(task, w)]
    return {"keywords": rng.sample(pool, 2)}


def _sample_forbidden(rng: random.Random, task: str) -> dict:
    # Forbidding a word of the task itself would make the task near impossible.
    pool = [w for w in FORBIDDEN_WORDS if not _mentions(task, w)]
    return {"forbidden_words": [rng.choice(pool)]}


def _no_kwargs(rng: random.Random, task: str) -> dict:
    return {}


class InstructionType(NamedTuple):
    """One verifiable instruction type: how to check it, phrase it and draw its parameters."""

    checker: Callable[..., bool]
    # str.format templates over the kwargs (lists render as "a" and "b"); one is drawn.
    templates: tuple[str, ...]
    # (rng, base task) -> kwargs for the checker (JSON-serialisable: lists, not tuples).
    sample_kwargs: Callable[[random.Random, str], dict]


INSTRUCTION_TYPES: dict[str, InstructionType] = {
    "length_constraints:number_words": InstructionType(
        check_number_words,
        ("Answer with {relation} {num_words} words.", "Use {relation} {num_words} words."),
        _sample_number_words,
    ),
    "length_constraints:number_sentences": InstructionType(
        check_number_sentences,
        (
            "Your answer must contain {relation} {num_sentences} sentences.",
            "Write {relation} {num_sentences} sentences.",
        ),
        _sample_number_sentences,
    ),
    "length_constraints:number_paragraphs": InstructionType(
        check_number_paragraphs,
        (
            "Write exactly {num_paragraphs} paragraphs separated by a blank line.",
            "There should be {num_paragraphs} paragraphs. Separate them with the markdown divider ***.",
        ),
        lambda rng, task: {"num_paragraphs": rng.choice(NUM_PARAGRAPHS)},
    ),
    "length_constraints:one_word": InstructionType(
        check_one_word,
        ("Answer with one word only.", "Your entire answer must be a single word."),
        _no_kwargs,
    ),
    "change_case:english_capital": InstructionType(
        check_english_capital,
        (
            "Your entire answer should be in English and in all capital letters.",
            "Write your whole answer in capital letters.",
        ),
        _no_kwargs,
    ),
    "change_case:english_lowercase": InstructionType(
        check_english_lowercase,
        (
            "Your entire answer must be in lowercase letters. No capital letters are allowed.",
            "Write your whole answer in English using only lowercase letters.",
        ),
        _no_kwargs,
    ),
    "keywords:existence": InstructionType(
        check_keywords_existence,
        (
            "Include the keywords {keywords} in your answer.",
            "Make sure to use the words {keywords} in your answer.",
        ),
        _sample_keywords,
    ),
    "keywords:forbidden_words": InstructionType(
        check_forbidden_words,
        (
            "Do not use the word {forbidden_words} anywhere in your answer.",
            "Do not include the word {forbidden_words} in your answer.",
        ),
        _sample_forbidden,
    ),
    "detectable_format:number_bullet_lists": InstructionType(
        check_number_bullets,
        (
            "Your answer must contain exactly {num_bullets} bullet points. Use markdown bullet "
            'points such as "* This is a point".',
            'Answer with exactly {num_bullets} bullet points, each on its own line starting with "- ".',
        ),
        lambda rng, task: {"num_bullets": rng.choice(NUM_BULLETS)},
    ),
    "detectable_format:json_format": InstructionType(
        check_json_format,
        (
            "Wrap your entire answer in JSON format as an object with the keys {keys}. You can "
            "use markdown ticks such as ```.",
            "Give your answer as a JSON object with the keys {keys} and nothing else.",
        ),
        lambda rng, task: {"keys": list(rng.choice(JSON_KEY_SETS))},
    ),
    "detectable_format:number_highlighted_sections": InstructionType(
        check_number_highlights,
        (
            "Highlight at least {num_highlights} sections in your answer with markdown, i.e. "
            "*highlighted section*.",
            "Mark at least {num_highlights} parts of your answer in *italics* like *this*.",
        ),
        lambda rng, task: {"num_highlights": rng.choice(NUM_HIGHLIGHTS)},
    ),
    "detectable_format:title": InstructionType(
        check_title,
        (
            "Your answer must contain a title wrapped in double angular brackets, such as "
            "<<poem of joy>>.",
            "Give your answer a title in double angular brackets like <<my title>>.",
        ),
        _no_kwargs,
    ),
    "detectable_content:number_placeholders": InstructionType(
        check_number_placeholders,
        (
            "The answer must contain at least {num_placeholders} placeholders represented by "
            "square brackets, such as [address].",
            "Include at least {num_placeholders} placeholders in square brackets like [name].",
        ),
        lambda rng, task: {"num_placeholders": rng.choice(NUM_PLACEHOLDERS)},
    ),
    "detectable_content:postscript": InstructionType(
        check_postscript,
        (
            "At the end of your answer add a postscript starting with {postscript_marker}",
            "End your answer with a short note that starts with {postscript_marker}",
        ),
        lambda rng, task: {"postscript_marker": "P.S."},
    ),
    "startend:start_checker": InstructionType(
        check_start_phrase,
        (
            'Begin your answer with the exact phrase "{start_phrase}".',
            'Start your answer with "{start_phrase}".',
        ),
        lambda rng, task: {"start_phrase": rng.choice(START_PHRASES)},
    ),
    "startend:end_checker": InstructionType(
        check_end_phrase,
        (
            'Finish your answer with the exact phrase "{end_phrase}" and add nothing after it.',
            'The final words of your answer must be "{end_phrase}" with nothing after them.',
        ),
        lambda rng, task: {"end_phrase": rng.choice(END_PHRASES)},
    ),
    "startend:quotation": InstructionType(
        check_quotation,
        (
            "Wrap your entire answer in double quotation marks.",
            'Put your whole answer inside double quotes (").',
        ),
        _no_kwargs,
    ),
    "punctuation:no_comma": InstructionType(
        check_no_comma,
        (
            "Do not use any commas in your answer.",
            "In your entire answer refrain from the use of any commas.",
        ),
        _no_kwargs,
    ),
    "combination:repeat_prompt": InstructionType(
        check_repeat_prompt,
        (
            "First repeat the request word for word without change, then give your answer "
            "(1. do not say any words or characters before repeating the request; 2. the "
            "request you need to repeat does not include this sentence)",
        ),
        lambda rng, task: {"prompt_to_repeat": task},
    ),
}

# Types that make sense only alone: repeating "the request" is ambiguous once a second
# constraint sentence is part of it.
EXCLUSIVE_TYPES: frozenset[str] = frozenset({"combination:repeat_prompt"})

_CONFLICT_LISTS: dict[str, tuple[str, ...]] = {
    "change_case:english_capital": (
        "change_case:english_lowercase",
        "detectable_format:json_format",  # required keys are lowercase
    ),
    "length_constraints:one_word": (
        "length_constraints:number_words",
        "length_constraints:number_sentences",
        "length_constraints:number_paragraphs",
        "detectable_format:number_bullet_lists",
        "detectable_format:json_format",
        "detectable_format:number_highlighted_sections",
        "detectable_format:title",
        "detectable_content:number_placeholders",
        "detectable_content:postscript",
        "startend:start_checker",
        "startend:end_checker",
        "keywords:existence",
    ),
    "detectable_format:json_format": (
        "length_constraints:number_sentences",
        "length_constraints:number_paragraphs",
        "detectable_format:number_bullet_lists",
        "detectable_format:number_highlighted_sections",
        "detectable_format:title",
        "detectable_content:number_placeholders",
        "detectable_content:postscript",
        "startend:start_checker",
        "startend:end_checker",
        "startend:quotation",
        "punctuation:no_comma",  # objects with two keys need a comma
    ),
    "detectable_format:number_bullet_lists": (
        "length_constraints:number_sentences",
        "length_constraints:number_paragraphs",
        "startend:quotation",  # a leading quote breaks the first bullet line
    ),
    "length_constraints:number_sentences": (
        "length_constraints:number_words",
        "length_constraints:number_paragraphs",
    ),
    "detectable_content:postscript": ("startend:end_checker",),
    "detectable_format:title": ("startend:start_checker",),
}


def _build_conflicts() -> frozenset[frozenset[str]]:
    pairs = {frozenset((a, b)) for a, bs in _CONFLICT_LISTS.items() for b in bs}
    pairs |= {frozenset((e, t)) for e in EXCLUSIVE_TYPES for t in INSTRUCTION_TYPES if t != e}
    return frozenset(pairs)


# Unordered pairs of instruction types never combined in one prompt.
CONFLICTS: frozenset[frozenset[str]] = _build_conflicts()


def compatible(instruction_ids: Sequence[str]) -> bool:
    """True when no two of ``instruction_ids`` conflict (and none repeats)."""
    for i in instruction_ids:
        _require_known(i)
    if len(set(instruction_ids)) != len(instruction_ids):
        return False
    return not any(
        frozenset((a, b)) in CONFLICTS
        for k, a in enumerate(instruction_ids)
        for b in instruction_ids[k + 1 :]
    )


def _require_known(instruction_id: str) -> InstructionType:
    try:
        return INSTRUCTION_TYPES[instruction_id]
    except KeyError:
        raise ValueError(
            f"unknown instruction id {instruction_id!r}; known: {sorted(INSTRUCTION_TYPES)}"
        ) from None


def _render(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " and ".join(f'"{v}"' for v in value)
    return str(value)


def describe(instruction_id: str, kwargs: Mapping[str, Any], template_index: int = 0) -> str:
    """The natural-language instruction sentence for ``instruction_id`` with ``kwargs``."""
    templates = _require_known(instruction_id).templates
    if not 0 <= template_index < len(templates):
        raise ValueError(
            f"{instruction_id}: template_index {template_index} out of range 0..{len(templates) - 1}"
        )
    return templates[template_index].format(**{k: _render(v) for k, v in kwargs.items()})


# --------------------------------------------------------------------------------------------
# IFEval strict / loose scoring.


def check_instruction(instruction_id: str, response: str, kwargs: Mapping[str, Any]) -> bool:
    """Strict IFEval check of one instruction: an empty response never follows anything."""
    checker = _require_known(instruction_id).checker
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    if not response.strip():
        return False
    try:
        return bool(checker(response, **dict(kwargs)))
    except TypeError as err:
        raise ValueError(f"{instruction_id}: bad kwargs {dict(kwargs)!r}: {err}") from None


def loose_variants(response: str) -> list[str]:
    """IFEval's eight loose variants, in IFEval's order.

    The response; '*' removed; first line removed; last line removed; both removed; and the
    last three with '*' removed. Removing a first/last line forgives "Sure, here it is:"
    preambles and sign-offs; removing '*' forgives markdown emphasis.
    """
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]


def check_instruction_loose(instruction_id: str, response: str, kwargs: Mapping[str, Any]) -> bool:
    """Loose IFEval check: the instruction passes on any non-empty loose variant."""
    return any(check_instruction(instruction_id, r, kwargs) for r in loose_variants(response))


def _pairs(instruction_ids: Sequence[str], kwargs_list: Sequence[Mapping[str, Any]]):
    if isinstance(instruction_ids, str):
        raise ValueError("instruction_ids must be a list of ids, got a string")
    if len(instruction_ids) != len(kwargs_list):
        raise ValueError(
            f"{len(instruction_ids)} instruction_ids but {len(kwargs_list)} kwargs entries"
        )
    return zip(instruction_ids, kwargs_list, strict=True)


def evaluate_strict(
    instruction_ids: Sequence[str], kwargs_list: Sequence[Mapping[str, Any]], response: str
) -> list[bool]:
    """Per-instruction strict results (IFEval ``test_instruction_following_strict``)."""
    return [check_instruction(i, response, kw) for i, kw in _pairs(instruction_ids, kwargs_list)]


def evaluate_loose(
    instruction_ids: Sequence[str], kwargs_list: Sequence[Mapping[str, Any]], response: str
) -> list[bool]:
    """Per-instruction loose results (IFEval ``test_instruction_following_loose``)."""
    return [
        check_instruction_loose(i, response, kw) for i, kw in _pairs(instruction_ids, kwargs_list)
    ]


def prompt_level_accuracy(results: Sequence[Sequence[bool]]) -> float:
    """Fraction of prompts whose instructions ALL pass (IFEval ``prompt_level_*_acc``)."""
    if not results:
        raise ValueError("no prompts to score")
    if any(len(r) == 0 for r in results):
        raise ValueError("a prompt has no instruction results")
    return sum(all(r) for r in results) / len(results)


def instruction_level_accuracy(results: Sequence[Sequence[bool]]) -> float:
    """Fraction of all instructions, pooled over prompts, that pass (IFEval ``inst_level_*_acc``)."""
    flat = [bool(x) for r in results for x in r]
    if not flat:
        raise ValueError("no instructions to score")
    return sum(flat) / len(flat)
