"""Verifiable instructions: pure checker functions that decide success, plus IFEval scoring.

Every arm (base zero-shot, base + in-context examples, SFT, DPO, CAI) is scored by these
functions and nothing else: no length, judge or likelihood proxy that a base model can game.

Semantics follow IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language
Models", google-research/instruction_following_eval; the same code ships as
lm-evaluation-harness ``lm_eval/tasks/ifeval/instructions.py``). Each checker's docstring names
the IFEval class it ports and says where, and why, this module differs. Written by hand
because the maintained ports need NLTK punkt data (not available offline) and pull heavy
dependencies (see ``count_sentences``).

A checker is ``check_x(response: str, **kwargs) -> bool``; ``INSTRUCTION_TYPES`` maps an
instruction id (IFEval's id where IFEval has the type) to its checker, description templates
and parameter sampler. ``evaluate_strict`` / ``evaluate_loose`` are IFEval's
``test_instruction_following_strict`` / ``_loose``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

# --------------------------------------------------------------------------------------------
# Text statistics (IFEval instructions_util).

_RELATIONS = ("less than", "at most", "at least", "exactly")


def count_words(text: str) -> int:
    """Number of ``\\w+`` tokens: IFEval's ``count_words`` (nltk RegexpTokenizer(r"\\w+"))."""
    return len(re.findall(r"\w+", text))


# IFEval instructions_util.split_into_sentences, ported verbatim (regexes and order).
_ALPHABETS = "([A-Za-z])"
_PREFIXES = "(Mr|St|Mrs|Ms|Dr)[.]"
_SUFFIXES = "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)"
_ACRONYMS = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_WEBSITES = "[.](com|net|org|io|gov|edu|me)"
_DIGITS = "([0-9])"
_MULTIPLE_DOTS = r"\.{2,}"


def split_into_sentences(text: str) -> list[str]:
    """Sentences of ``text`` by IFEval's rule-based splitter (``split_into_sentences``).

    Abbreviations (Mr., Dr., e.g. single letters), decimals, websites and ellipses do not end a
    sentence; ``.``, ``?`` and ``!`` do. Text without final punctuation is one sentence.
    """
    text = " " + text + "  "
    text = text.replace("\n", " ")
    text = re.sub(_PREFIXES, "\\1<prd>", text)
    text = re.sub(_WEBSITES, "<prd>\\1", text)
    text = re.sub(_DIGITS + "[.]" + _DIGITS, "\\1<prd>\\2", text)
    text = re.sub(_MULTIPLE_DOTS, lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    if "Ph.D" in text:
        text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + _ALPHABETS + "[.] ", " \\1<prd> ", text)
    text = re.sub(_ACRONYMS + " " + _STARTERS, "\\1<stop> \\2", text)
    text = re.sub(
        _ALPHABETS + "[.]" + _ALPHABETS + "[.]" + _ALPHABETS + "[.]",
        "\\1<prd>\\2<prd>\\3<prd>",
        text,
    )
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>", text)
    text = re.sub(" " + _SUFFIXES + "[.] " + _STARTERS, " \\1<stop> \\2", text)
    text = re.sub(" " + _SUFFIXES + "[.]", " \\1<prd>", text)
    text = re.sub(" " + _ALPHABETS + "[.]", " \\1<prd>", text)
    if "\u201d" in text:
        text = text.replace(".\u201d", "\u201d.")
    if '"' in text:
        text = text.replace('."', '".')
    if "!" in text:
        text = text.replace('!"', '"!')
    if "?" in text:
        text = text.replace('?"', '"?')
    text = text.replace(".", ".<stop>")
    text = text.replace("?", "?<stop>")
    text = text.replace("!", "!<stop>")
    text = text.replace("<prd>", ".")
    sentences = [s.strip() for s in text.split("<stop>")]
    # A split can leave empty pieces ("Hi. ." or "!?"): they are not sentences.
    return [s for s in sentences if s]


def count_sentences(text: str) -> int:
    """Number of sentences, by IFEval's rule-based splitter.

    Deviation: IFEval's ``count_sentences`` uses NLTK's punkt model, whose data cannot be
    downloaded here (``if-verifiable`` 0.1.2 raised LookupError 'punkt_tab' offline). The
    rule-based splitter from the same IFEval file agrees with punkt on ordinary prose; it
    differs on rare abbreviations punkt learned (e.g. "approx.") and drops empty pieces.
    """
    return len(split_into_sentences(text))


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _compare(count: int, threshold: Any, relation: str, name: str) -> bool:
    threshold = _positive_int(threshold, name)
    if relation == "less than":
        return count < threshold
    if relation == "at most":
        return count <= threshold
    if relation == "at least":
        return count >= threshold
    if relation == "exactly":
        return count == threshold
    raise ValueError(f"relation must be one of {_RELATIONS}, got {relation!r}")


def _word_list(words: Any, name: str) -> list[str]:
    if isinstance(words, str) or not isinstance(words, Iterable):
        raise ValueError(f"{name} must be a list of strings, got {words!r}")
    words = list(words)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {words!r}")
    return words


def _phrase(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Checkers. Each is pure and takes the response (already cut at the end-of-response marker and
# stripped by utils.response_format.clean_response) plus the instruction's kwargs.


def check_number_words(response: str, *, num_words: int, relation: str) -> bool:
    """Word count bound. IFEval ``NumberOfWords`` (relations "less than", "at least").

    Adds "at most" (<=) and "exactly" because "answer in at most 30 words" is the natural
    phrasing for short answers; "less than" keeps IFEval's strict <.
    """
    return _compare(count_words(response), num_words, relation, "num_words")


def check_number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    """Sentence count bound. IFEval ``NumberOfSentences``, with ``count_sentences`` above.

    Adds "at most" and "exactly" to IFEval's "less than" / "at least".
    """
    return _compare(count_sentences(response), num_sentences, relation, "num_sentences")


def count_paragraphs(response: str) -> int | None:
    """Paragraphs split by ``***`` dividers (IFEval) and by blank lines; None if malformed.

    IFEval ``ParagraphChecker`` splits on ``\\s?\\*\\*\\*\\s?`` only; an empty piece at the
    start or end is dropped, an empty piece in the middle ("a *** *** b") makes the response
    fail (None here). Blank lines also separate paragraphs here (IFEval's
    ``nth_paragraph_first_word`` splits on "\\n\\n"), because short answers use them.
    """
    pieces = re.split(r"\s?\*\*\*\s?", response)
    count = 0
    for index, piece in enumerate(pieces):
        if not piece.strip():
            if index in (0, len(pieces) - 1):
                continue
            return None
        count += sum(1 for p in re.split(r"\n\s*\n", piece) if p.strip())
    return count


def check_number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` paragraphs (see ``count_paragraphs``). IFEval ``ParagraphChecker``."""
    _positive_int(num_paragraphs, "num_paragraphs")
    return count_paragraphs(response) == num_paragraphs


def check_one_word(response: str) -> bool:
    """The whole answer is one word (one ``\\w+`` token; punctuation around it is allowed).

    Not an IFEval type; uses IFEval's word count, so "Jupiter." passes and "ice-cream" (two
    tokens) fails.
    """
    return count_words(response) == 1


def check_english_capital(response: str) -> bool:
    """All letters are capitals. IFEval ``CapitalLettersEnglishChecker`` (``str.isupper``).

    Deviation: IFEval also requires ``langdetect.detect(response) == "en"``; langdetect is
    random unless seeded and unreliable on the short answers scored here, so it is not used.
    """
    return response.isupper()


def check_english_lowercase(response: str) -> bool:
    """All letters are lowercase. IFEval ``LowercaseLettersEnglishChecker`` (``str.islower``).

    Deviation: no langdetect English check (see ``check_english_capital``).
    """
    return response.islower()


def check_keywords_existence(response: str, *, keywords: Sequence[str]) -> bool:
    """Every keyword occurs, case-insensitive, as a substring. IFEval ``KeywordChecker``.

    IFEval searches the keyword as a regex without word boundaries ("time" is found in
    "sometimes"); keywords are ``re.escape``d here, which is the same for plain words.
    """
    words = _word_list(keywords, "keywords")
    return all(re.search(re.escape(w), response, flags=re.IGNORECASE) for w in words)


def check_forbidden_words(response: str, *, forbidden_words: Sequence[str]) -> bool:
    """No forbidden word occurs as a whole word, case-insensitive. IFEval ``ForbiddenWords``."""
    words = _word_list(forbidden_words, "forbidden_words")
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE) for w in words
    )


def count_bullets(response: str) -> int:
    """Markdown bullet lines, exactly as IFEval ``BulletListChecker`` counts them.

    A line starting (after spaces) with ``*`` not followed by another ``*``, or with ``-``
    (IFEval's regex has no space requirement, so a line "-5 degrees" counts too).
    """
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes)


def check_number_bullets(response: str, *, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullet points. IFEval ``BulletListChecker``."""
    _positive_int(num_bullets, "num_bullets")
    return count_bullets(response) == num_bullets


def parse_json_answer(response: str) -> Any:
    """The JSON value of a response, ``` fences allowed as IFEval ``JsonFormat`` strips them.

    Raises ValueError when the text is not JSON.
    """
    value = (
        response.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    return json.loads(value)


def check_json_format(response: str, *, keys: Sequence[str] = ()) -> bool:
    """The answer is a JSON object holding ``keys``. IFEval ``JsonFormat``, stricter.

    IFEval accepts any JSON value, so a bare ``5`` or ``"ocean"`` passes "wrap your answer in
    JSON"; that is gameable, so an object is required here, with every key in ``keys``.
    """
    required = _word_list(keys, "keys") if keys else []
    try:
        value = parse_json_answer(response)
    except ValueError:
        return False
    return isinstance(value, dict) and all(k in value for k in required)


def count_highlights(response: str) -> int:
    """Highlighted sections ``*x*`` and ``**x**`` with non-blank text, as IFEval counts them.

    IFEval ``HighlightSectionChecker`` counts ``\\*[^\\n\\*]*\\*`` and ``\\*\\*[^\\n\\*]*\\*\\*``
    matches separately (so ``**x**`` counts once, via the second pattern).
    """
    singles = re.findall(r"\*[^\n\*]*\*", response)
    doubles = re.findall(r"\*\*[^\n\*]*\*\*", response)
    count = sum(1 for h in singles if h.strip("*").strip())
    count += sum(1 for h in doubles if h.removeprefix("**").removesuffix("**").strip())
    return count


def check_number_highlights(response: str, *, num_highlights: int) -> bool:
    """At least ``num_highlights`` highlighted sections. IFEval ``HighlightSectionChecker``."""
    return count_highlights(response) >= _positive_int(num_highlights, "num_highlights")


def check_title(response: str) -> bool:
    """A title in double angular brackets, ``<<title>>``, non-blank. IFEval ``TitleChecker``."""
    titles = re.findall(r"<<[^\n]+>>", response)
    return any(t.lstrip("<").rstrip(">").strip() for t in titles)


def check_number_placeholders(response: str, *, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders like ``[name]``.

    IFEval ``PlaceholderChecker`` (regex ``\\[.*?\\]``, so ``[]`` counts as one).
    """
    found = len(re.findall(r"\[.*?\]", response))
    return found >= _positive_int(num_placeholders, "num_placeholders")


def check_postscript(response: str, *, postscript_marker: str = "P.S.") -> bool:
    """A postscript starting with ``postscript_marker``. IFEval ``PostscriptChecker``.

    As in IFEval the lowercased marker ("p.s." allowing "p. s.", "p.p.s" allowing spaces)
    may stand anywhere in a line, not only at the end of the answer.
    """
    marker = _phrase(postscript_marker, "postscript_marker")
    value = response.lower()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, value, flags=re.MULTILINE))


def check_start_phrase(response: str, *, start_phrase: str) -> bool:
    """The answer starts with ``start_phrase``, case-insensitive; surrounding '"' ignored.

    Not an IFEval type (IFEval's ``constrained_start`` is multi-turn only); it mirrors IFEval
    ``EndChecker`` at the other end: ``response.strip().strip('"').lower().startswith(...)``.
    """
    phrase = _phrase(start_phrase, "start_phrase").strip().lower()
    return response.strip().strip('"').lower().startswith(phrase)


def check_end_phrase(response: str, *, end_phrase: str) -> bool:
    """The answer ends with ``end_phrase``, case-insensitive; surrounding '"' ignored.

    IFEval ``EndChecker``.
    """
    phrase = _phrase(end_phrase, "end_phrase").strip().lower()
    return response.strip().strip('"').lower().endswith(phrase)


def check_quotation(response: str) -> bool:
    """The whole answer is wrapped in double quotes. IFEval ``QuotationChecker``."""
    value = response.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def check_no_comma(response: str) -> bool:
    """No comma anywhere. IFEval ``CommaChecker``."""
    return "," not in response


def check_repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """The answer starts by repeating the request, case-insensitive. IFEval ``RepeatPromptThenAnswer``."""
    request = _phrase(prompt_to_repeat, "prompt_to_repeat").strip().lower()
    return response.strip().lower().startswith(request)


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
