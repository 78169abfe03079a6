"""Verifiable instruction checkers: pure functions that decide whether a response follows one
instruction, and the text statistics they count with.

Semantics follow IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language
Models", google-research/instruction_following_eval; the same code ships as
lm-evaluation-harness ``lm_eval/tasks/ifeval/instructions.py``). Each checker's docstring names
the IFEval class it ports and says where, and why, this module differs. Written by hand
because the maintained ports need NLTK punkt data (not available offline) and pull heavy
dependencies (see ``count_sentences``).

A checker is ``check_x(response: str, **kwargs) -> bool``. Which checker decides which
instruction id, how the instruction is phrased and how its parameters are drawn is
``utils.verifiable_checks.INSTRUCTION_TYPES``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

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
