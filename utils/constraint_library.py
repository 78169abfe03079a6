"""The constraint library as data: every checkable constraint type with its family, phrasings,
parameter samplers and checker, the train / held-out split BY TYPE, and stage-1 augmentation.

The evaluation (``utils.eval_prompts``) phrases a constraint with the type's ``eval_phrasings``
(the templates of ``utils.verifiable_checks.INSTRUCTION_TYPES``) and draws values from the
eval pools there. Training instructions use other words for the same rule: ``train_phrasings``
below, and other keywords, forbidden words, start/end phrases and JSON keys. So a trained arm
never sees an evaluation phrasing, and a HELD-OUT type (IFBench protocol, arXiv 2507.02833)
never reaches training at all: the split is by type, never by prompt.

``augment`` turns one self-generated task ("Describe a lighthouse.") into a training
instruction with 0..N constraints of TRAIN types ("Describe a lighthouse. Keep the reply under
40 words."), storing the checker ids and kwargs beside the text, so a program can verify any
response to it (``utils.verifiable_checks.evaluate_strict``).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from utils.errors import ProjectInputError
from utils.verifiable_checks import (
    CONFLICTS,
    EXCLUSIVE_TYPES,
    INSTRUCTION_TYPES,
    _mentions,
    _render,
    _sample_relation_count,
    compatible,
)

FAMILIES: dict[str, str] = {
    "length_constraints:number_words": "length",
    "length_constraints:number_sentences": "length",
    "length_constraints:number_paragraphs": "length",
    "length_constraints:one_word": "length",
    "change_case:english_capital": "case",
    "change_case:english_lowercase": "case",
    "keywords:existence": "keywords",
    "keywords:forbidden_words": "keywords",
    "detectable_format:number_bullet_lists": "format",
    "detectable_format:json_format": "format",
    "detectable_format:number_highlighted_sections": "format",
    "detectable_format:title": "format",
    "detectable_content:number_placeholders": "content",
    "detectable_content:postscript": "content",
    "startend:start_checker": "start_end",
    "startend:end_checker": "start_end",
    "startend:quotation": "start_end",
    "punctuation:no_comma": "punctuation",
    "combination:repeat_prompt": "combination",
}

# Training phrasings: none may match an evaluation template (``eval_phrasing_match``), which a
# test checks on every rendering. Fields are the checker's kwargs, rendered by ``_render``.
TRAIN_PHRASINGS: dict[str, tuple[str, ...]] = {
    "length_constraints:number_words": (
        "Keep the reply {relation} {num_words} words long.",
        "The response should be {relation} {num_words} words in length.",
    ),
    "length_constraints:number_sentences": (
        "Reply in {relation} {num_sentences} sentences.",
        "The response should have {relation} {num_sentences} sentences.",
    ),
    "length_constraints:number_paragraphs": (
        "Split the reply into {num_paragraphs} paragraphs with an empty line between them.",
        "Give {num_paragraphs} paragraphs, separated by blank lines.",
    ),
    "length_constraints:one_word": (
        "Reply with just one word.",
        "Respond using a single word and nothing more.",
    ),
    "change_case:english_capital": (
        "Reply using only uppercase letters.",
        "The response must be written entirely in uppercase.",
    ),
    "change_case:english_lowercase": (
        "Reply using only lowercase letters.",
        "The response must be written entirely in lowercase, with no uppercase letters at all.",
    ),
    "keywords:existence": (
        "The reply has to mention {keywords}.",
        "Be sure the response contains {keywords}.",
    ),
    "keywords:forbidden_words": (
        "Avoid the word {forbidden_words} completely.",
        "The response must never contain the word {forbidden_words}.",
    ),
    "detectable_format:number_bullet_lists": (
        'Reply as a list of exactly {num_bullets} items, each line starting with "* ".',
        "Give exactly {num_bullets} markdown bullets and no other lines.",
    ),
    "detectable_format:json_format": (
        "Reply only with a JSON object that has the keys {keys}.",
        "Format the response as JSON: one object with the keys {keys}.",
    ),
    "detectable_format:number_highlighted_sections": (
        "Put *asterisks* around at least {num_highlights} phrases of the reply.",
        "Emphasize {num_highlights} or more phrases by wrapping them in single asterisks.",
    ),
    "detectable_format:title": (
        "Put a title inside double angle brackets, for example <<a short title>>, at the top.",
        "Start the reply with a title written as <<title>>.",
    ),
    "detectable_content:number_placeholders": (
        "Leave at least {num_placeholders} blanks to fill in, written as [placeholder].",
        "Use {num_placeholders} or more square-bracket fields such as [date] in the reply.",
    ),
    "detectable_content:postscript": (
        "Close the reply with a line beginning with {postscript_marker}",
        "After the main reply add a note that begins {postscript_marker}",
    ),
    "startend:start_checker": (
        'The first words of the reply must be "{start_phrase}".',
        'Open the response with "{start_phrase}" exactly.',
    ),
    "startend:end_checker": (
        'The reply must end with "{end_phrase}" and nothing after it.',
        'Close the response with the words "{end_phrase}" exactly.',
    ),
    "startend:quotation": (
        "Enclose the whole reply in double quotes.",
        'The response must begin and end with a " character.',
    ),
    "punctuation:no_comma": (
        "The reply must not contain a single comma.",
        "Write the response with no commas at all.",
    ),
    "combination:repeat_prompt": (
        "Copy the request exactly as written, then respond to it (do not write anything before "
        "the copy, and do not copy this sentence).",
        "Start by restating the request word for word, and only then reply (the restated "
        "request leaves out this sentence).",
    ),
}

# Training values, disjoint from the evaluation pools in utils.verifiable_checks (a test checks
# it): the model must learn to follow the rule, not to recall the evaluation's words.
TRAIN_WORD_BOUNDS: dict[str, tuple[int, ...]] = {
    "at most": (10, 25, 50),
    "less than": (12, 30, 45),
    "at least": (10, 15, 25),
}
TRAIN_SENTENCE_BOUNDS: dict[str, tuple[int, ...]] = {
    "at most": (1, 4),
    "exactly": (1, 4),
    "at least": (2,),
}
TRAIN_NUM_PARAGRAPHS = (2, 3)
TRAIN_NUM_BULLETS = (2, 3, 4, 5)
TRAIN_NUM_HIGHLIGHTS = (2, 3)
TRAIN_NUM_PLACEHOLDERS = (2, 3)
TRAIN_KEYWORDS = (
    "river", "garden", "kitchen", "bright", "quiet", "summer", "paper", "yellow", "family",
    "ocean", "green", "school", "winter", "tiny", "happy", "market",
)  # fmt: skip
TRAIN_FORBIDDEN_WORDS = ("nice", "big", "small", "great", "new", "old", "fun", "easy")
TRAIN_JSON_KEY_SETS: tuple[tuple[str, ...], ...] = (
    ("reply",),
    ("name", "reason"),
    ("subject", "text"),
    ("idea", "example"),
)
TRAIN_START_PHRASES = ("Sure thing", "Well", "Here goes:", "Okay so")
TRAIN_END_PHRASES = ("Hope this helps.", "Have a nice day!", "Good luck!", "The end.")


def _train_kwargs(type_id: str, rng: random.Random, task: str) -> dict[str, Any]:
    """Training parameters for ``type_id`` on ``task`` (JSON-serialisable)."""
    if type_id == "length_constraints:number_words":
        relation, n = _sample_relation_count(TRAIN_WORD_BOUNDS, rng)
        return {"num_words": n, "relation": relation}
    if type_id == "length_constraints:number_sentences":
        relation, n = _sample_relation_count(TRAIN_SENTENCE_BOUNDS, rng)
        return {"num_sentences": n, "relation": relation}
    if type_id == "length_constraints:number_paragraphs":
        return {"num_paragraphs": rng.choice(TRAIN_NUM_PARAGRAPHS)}
    if type_id == "keywords:existence":
        pool = [w for w in TRAIN_KEYWORDS if not _mentions(task, w)]
        return {"keywords": rng.sample(pool, rng.choice((1, 2)))}
    if type_id == "keywords:forbidden_words":
        pool = [w for w in TRAIN_FORBIDDEN_WORDS if not _mentions(task, w)]
        return {"forbidden_words": [rng.choice(pool)]}
    if type_id == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.choice(TRAIN_NUM_BULLETS)}
    if type_id == "detectable_format:json_format":
        return {"keys": list(rng.choice(TRAIN_JSON_KEY_SETS))}
    if type_id == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.choice(TRAIN_NUM_HIGHLIGHTS)}
    if type_id == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.choice(TRAIN_NUM_PLACEHOLDERS)}
    if type_id == "detectable_content:postscript":
        return {"postscript_marker": "P.S."}
    if type_id == "startend:start_checker":
        return {"start_phrase": rng.choice(TRAIN_START_PHRASES)}
    if type_id == "startend:end_checker":
        return {"end_phrase": rng.choice(TRAIN_END_PHRASES)}
    if type_id == "combination:repeat_prompt":
        return {"prompt_to_repeat": task}
    return {}


@dataclass(frozen=True)
class ConstraintType:
    """One checkable constraint type: family, checker, phrasings (eval and train), samplers."""

    id: str
    family: str
    checker: Callable[..., bool]
    eval_phrasings: tuple[str, ...]
    train_phrasings: tuple[str, ...]
    sample_eval: Callable[[random.Random, str], dict]

    def sample_train(self, rng: random.Random, task: str) -> dict[str, Any]:
        return _train_kwargs(self.id, rng, task)

    @property
    def phrasings(self) -> tuple[str, ...]:
        return self.eval_phrasings + self.train_phrasings


LIBRARY: dict[str, ConstraintType] = {
    t: ConstraintType(
        id=t,
        family=FAMILIES[t],
        checker=spec.checker,
        eval_phrasings=spec.templates,
        train_phrasings=TRAIN_PHRASINGS[t],
        sample_eval=spec.sample_kwargs,
    )
    for t, spec in INSTRUCTION_TYPES.items()
}


def render(template: str, kwargs: Mapping[str, Any]) -> str:
    return template.format(**{k: _render(v) for k, v in kwargs.items()})


# --------------------------------------------------------------------------------------------
# Evaluation phrasings as patterns: a training text "uses" an eval phrasing when the template,
# its fields matched by any text, occurs in it (case-insensitive).


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{[a-z_]+\}", template)
    return re.compile(r".{1,80}?".join(re.escape(p) for p in parts), flags=re.IGNORECASE)


EVAL_PHRASING_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (t, _template_pattern(tpl)) for t, c in LIBRARY.items() for tpl in c.eval_phrasings
)


def eval_phrasing_match(text: str) -> str | None:
    """The type id whose evaluation phrasing ``text`` contains, or None."""
    for type_id, pattern in EVAL_PHRASING_PATTERNS:
        if pattern.search(text):
            return type_id
    return None


# --------------------------------------------------------------------------------------------
# The split, declared in config (section ``constraints``).


class SplitError(ProjectInputError, ValueError):
    pass


@dataclass(frozen=True)
class TypeSplit:
    train: tuple[str, ...]
    held_out: tuple[str, ...]

    @classmethod
    def from_held_out(cls, held_out: Sequence[str]) -> TypeSplit:
        """Validate the declared held-out types: known, at least a third of all types, and
        every family with two or more types has one on each side."""
        if isinstance(held_out, str) or not held_out:
            raise SplitError("constraints.held_out must be a non-empty list of type ids")
        unknown = sorted(set(held_out) - set(LIBRARY))
        if unknown:
            raise SplitError(
                f"constraints.held_out: unknown types {unknown}; known {sorted(LIBRARY)}"
            )
        held = tuple(sorted(set(held_out)))
        train = tuple(sorted(set(LIBRARY) - set(held)))
        if 3 * len(held) < len(LIBRARY):
            raise SplitError(
                f"constraints.held_out has {len(held)} of {len(LIBRARY)} types; at least a "
                "third must be held out"
            )
        for family in sorted(set(FAMILIES.values())):
            members = [t for t, f in FAMILIES.items() if f == family]
            if len(members) >= 2:
                h = [t for t in members if t in held]
                if not h or len(h) == len(members):
                    raise SplitError(
                        f"constraints.held_out: family {family!r} ({members}) needs a type on "
                        "each side of the split"
                    )
        return cls(train=train, held_out=held)

    def tag(self, instruction_ids: Sequence[str]) -> str:
        """'held_out' when any of the prompt's types is held out, else 'seen'."""
        return "held_out" if any(t in self.held_out for t in instruction_ids) else "seen"

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "held_out": list(self.held_out)}


def constraint_mix(mix: Sequence[float]) -> tuple[float, ...]:
    """P(0 constraints), P(1), ...: non-negative, summing to 1."""
    if (
        isinstance(mix, str)
        or not mix
        or any(not isinstance(p, (int, float)) or p < 0 for p in mix)
    ):
        raise SplitError(f"constraints.mix must be a list of probabilities, got {mix!r}")
    if abs(sum(mix) - 1.0) > 1e-6:
        raise SplitError(f"constraints.mix must sum to 1, got {sum(mix)}")
    return tuple(float(p) for p in mix)


def _pick_types(n: int, train: Sequence[str], rng: random.Random) -> list[str]:
    for _ in range(50):
        chosen = [rng.choice(train)]
        while len(chosen) < n:
            options = [
                t for t in train
                if t not in chosen and t not in EXCLUSIVE_TYPES and chosen[0] not in EXCLUSIVE_TYPES
                and not any(frozenset((t, c)) in CONFLICTS for c in chosen)
            ]  # fmt: skip
            if not options:
                break
            chosen.append(rng.choice(options))
        if len(chosen) == n and compatible(chosen):
            return chosen
    return chosen[:1]


def augment(
    task: str, split: TypeSplit, mix: Sequence[float], rng: random.Random
) -> dict[str, Any]:
    """``task`` with 0..len(mix)-1 compatible TRAIN-type constraints in a training phrasing.

    Returns {instruction, task, instruction_ids, kwargs, phrasings} (``phrasings[i]`` is the
    index into the type's ``train_phrasings``)."""
    task = " ".join(task.split())
    n = rng.choices(range(len(mix)), weights=mix)[0]
    ids = _pick_types(n, split.train, rng) if n else []
    kwargs = [LIBRARY[t].sample_train(rng, task) for t in ids]
    phrasing_idx = [rng.randrange(len(LIBRARY[t].train_phrasings)) for t in ids]
    sentences = [
        render(LIBRARY[t].train_phrasings[i], kw)
        for t, i, kw in zip(ids, phrasing_idx, kwargs, strict=True)
    ]
    return {
        "instruction": " ".join([task, *sentences]),
        "task": task,
        "instruction_ids": ids,
        "kwargs": kwargs,
        "phrasings": phrasing_idx,
    }


def training_record_problems(record: Mapping[str, Any], split: TypeSplit) -> list[str]:
    """Why a training record (SFT, pair or CAI) breaks the held-out protocol: a held-out type
    among its constraints, or an evaluation phrasing in its instruction or prompt text."""
    problems = []
    held = [t for t in record.get("instruction_ids") or [] if t in split.held_out]
    if held:
        problems.append(f"held-out types {held}")
    for field in ("instruction", "prompt"):
        text = record.get(field)
        if isinstance(text, str):
            hit = eval_phrasing_match(text)
            if hit:
                problems.append(f"{field} uses an evaluation phrasing of {hit}")
    return problems


def constraints_from_config(
    section: Mapping[str, Any] | None,
) -> tuple[TypeSplit, tuple[float, ...], int]:
    """(split, mix, seed) from the config section ``constraints``, strictly validated."""
    d = dict(section or {})
    known = {"held_out", "mix", "seed"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SplitError(f"unknown constraints keys {unknown}; known: {sorted(known)}")
    missing = sorted(known - set(d))
    if missing:
        raise SplitError(f"constraints section lacks {missing} (see configs/cpu_default.yaml)")
    seed = d["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SplitError(f"constraints.seed must be an integer, got {seed!r}")
    return TypeSplit.from_held_out(d["held_out"]), constraint_mix(d["mix"]), seed


# --------------------------------------------------------------------------------------------
# Hindsight constraints: rules a response ALREADY follows, stated as a training instruction.


def _content_words(text: str) -> list[str]:
    from utils.verifiable_checks import FORBIDDEN_WORDS, KEYWORDS

    eval_words = {w.lower() for w in (*KEYWORDS, *FORBIDDEN_WORDS)}
    words = [w.lower() for w in re.findall(r"[A-Za-z]{5,}", text)]
    return sorted({w for w in words if w not in eval_words})


def hindsight_kwargs(type_id: str, response: str, task: str, rng: random.Random) -> dict | None:
    """Training kwargs of ``type_id`` that ``response`` satisfies, or None. String values are
    taken from the response itself (its opening words, its closing words, one of its words),
    never from the evaluation pools; other values are drawn from the training samplers."""
    from utils.verifiable_checks import check_instruction

    words = response.split()
    if type_id == "startend:start_checker":
        kw = {"start_phrase": " ".join(words[:2])} if len(words) >= 4 else None
    elif type_id == "startend:end_checker":
        kw = {"end_phrase": " ".join(words[-3:])} if len(words) >= 6 else None
    elif type_id == "keywords:existence":
        pool = [w for w in _content_words(response) if not _mentions(task, w)]
        kw = {"keywords": [rng.choice(pool)]} if pool else None
    elif type_id in ("combination:repeat_prompt", "detectable_content:postscript"):
        kw = None  # never satisfied by accident in a useful way
    else:
        kw = None
        for _ in range(6):
            trial = LIBRARY[type_id].sample_train(rng, task)
            if check_instruction(type_id, response, trial):
                kw = trial
                break
    if kw is None or not check_instruction(type_id, response, kw):
        return None
    return kw


def constrain_tasks(
    train_records: Sequence[Mapping[str, Any]], split: TypeSplit, mix: Sequence[float], seed: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Stage 1's self-generated training instructions, each augmented with 0..N TRAIN-type
    constraints (``utils.constraint_library.augment``, seeded by the record id). A task that
    already asks for a format of its own ("... in capital letters") is dropped: it would carry
    a rule no checker knows of (or a held-out one); so is one using an evaluation phrasing."""
    from utils.completion_prompts import infer_format_type

    out, dropped = [], Counter()
    for r in train_records:
        task = " ".join(str(r["instruction"]).split())
        if infer_format_type(task) is not None:
            dropped["task_states_a_format"] += 1
            continue
        if eval_phrasing_match(task):
            dropped["task_uses_an_eval_phrasing"] += 1
            continue
        aug = augment(task, split, mix, random.Random(f"{seed}:{r['id']}"))
        if eval_phrasing_match(aug["instruction"]):  # a task + constraint joining into one
            dropped["instruction_uses_an_eval_phrasing"] += 1
            continue
        out.append({"id": r["id"], "type": r.get("type"), **aug})
    return out, dict(dropped)
