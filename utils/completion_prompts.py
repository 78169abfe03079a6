"""Completion-style prompts that turn a BASE model into its own stage-1 data generator.

No chat format anywhere: a base model continues text, so every prompt here is a document the
model has plausibly seen before.

* Instruction generation: a plain header line and a numbered list of seed instructions, ending
  with the open next number ("9."). The model writes item 9; generation stops at the newline
  (``INSTRUCTION_STOP_STRINGS``). ``diversity_prompt`` mixes recently accepted instructions with
  seeds of one target category, and ``rotate_categories`` walks the categories so the generated
  set covers the types evenly.
* Parsing: ``parse_instruction_continuation`` keeps one clean line or says why not, as a
  ``ParsedInstruction`` with a reason from ``PARSE_REASONS``, so rejections are counted.
* Response generation: ``response_prompt`` draws 3-4 demonstrations from the pool in
  ``utils/data/response_examples.jsonl`` (one of the same type when it can) and formats them
  with the project's ONE format, ``utils.response_format.format_few_shot_prompt``.

The pools (``utils/data/seed_instructions.jsonl``, ``utils/data/response_examples.jsonl``) were
written for this project. Their topics avoid the evaluation tasks in ``utils.eval_prompts`` and
format-constrained examples carry ``checks`` that ``load_pool`` runs with the evaluation's own
checkers, so a demonstration that breaks its own constraint cannot be loaded.

Pure Python: no model, no tokenizer, no torch.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.chat_markup import find_chat_markup as _find_markup
from utils.jsonl_io import JsonlError, read_jsonl_numbered
from utils.response_format import INSTRUCTION_HEADER, RESPONSE_HEADER, format_few_shot_prompt

# Responses stop where the model starts the next "Instruction:" block (the shared format).
from utils.response_format import RESPONSE_STOP_STRINGS as RESPONSE_STOP_STRINGS
from utils.verifiable_checks import INSTRUCTION_TYPES, check_instruction

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_SEEDS_PATH = DATA_DIR / "seed_instructions.jsonl"
DEFAULT_EXAMPLES_PATH = DATA_DIR / "response_examples.jsonl"

# A generated instruction is one list item: the line ends it.
INSTRUCTION_STOP_STRINGS: tuple[str, ...] = ("\n",)

DEFAULT_LIST_HEADER = "A list of diverse tasks that a helpful assistant can do:"
# Category headers keep the list framing and name the target kind of task.
CATEGORY_HEADER_TEMPLATE = "A list of tasks that a helpful assistant can do, focusing on {desc}:"

# Content types: what the task asks for. Phrases complete CATEGORY_HEADER_TEMPLATE.
CONTENT_TYPES: dict[str, str] = {
    "open_qa": "answering short factual questions",
    "brainstorm_list": "brainstorming short lists of ideas",
    "classification": "sorting things into groups",
    "rewrite": "rewriting sentences",
    "summarize": "summarizing short texts",
    "extraction": "finding facts in a short text",
    "creative_writing": "writing short poems and stories",
    "explanation": "explaining how and why things happen",
    "advice": "giving practical advice",
    "comparison": "comparing two things",
    "math_word": "solving short math word problems",
    "definition": "defining words and terms",
}
# Format-constrained types: how the answer must look (what the evaluation rewards).
FORMAT_TYPES: dict[str, str] = {
    "format_lowercase": "answers written only in lowercase letters",
    "format_uppercase": "answers written only in capital letters",
    "format_bullets": "answers given as an exact number of bullet points",
    "format_one_word": "one-word answers",
    "format_word_limit": "answers with a word limit",
    "format_sentence_count": "answers with a set number of sentences",
    "format_paragraphs": "answers split into a set number of paragraphs",
    "format_start_with": "answers that must start with a given phrase",
    "format_end_with": "answers that must end with a given phrase",
    "format_json": "answers given as a JSON object with given keys",
    "format_no_comma": "answers written without any commas",
    "format_keywords": "answers that must include given words",
    "format_forbidden_word": "answers that must avoid a given word",
    "format_quotation": "answers wrapped in double quotation marks",
    "format_title": "answers with a title in double angular brackets",
    "format_placeholders": "answers with placeholders in square brackets",
    "format_postscript": "answers that end with a P.S. note",
    "format_highlights": "answers with highlighted parts in *asterisks*",
}
TYPE_DESCRIPTIONS: dict[str, str] = {**CONTENT_TYPES, **FORMAT_TYPES}
KNOWN_TYPES: tuple[str, ...] = tuple(TYPE_DESCRIPTIONS)
# The evaluation checker that decides each format type (utils.verifiable_checks ids).
FORMAT_CHECK_IDS: dict[str, str] = {
    "format_lowercase": "change_case:english_lowercase",
    "format_uppercase": "change_case:english_capital",
    "format_bullets": "detectable_format:number_bullet_lists",
    "format_one_word": "length_constraints:one_word",
    "format_word_limit": "length_constraints:number_words",
    "format_sentence_count": "length_constraints:number_sentences",
    "format_paragraphs": "length_constraints:number_paragraphs",
    "format_start_with": "startend:start_checker",
    "format_end_with": "startend:end_checker",
    "format_json": "detectable_format:json_format",
    "format_no_comma": "punctuation:no_comma",
    "format_keywords": "keywords:existence",
    "format_forbidden_word": "keywords:forbidden_words",
    "format_quotation": "startend:quotation",
    "format_title": "detectable_format:title",
    "format_placeholders": "detectable_content:number_placeholders",
    "format_postscript": "detectable_content:postscript",
    "format_highlights": "detectable_format:number_highlighted_sections",
}

# Role labels and Alpaca-style headers at a line start: chat or dataset scaffolding.
_ROLE_LABEL = re.compile(
    r"^\s*(?:#+\s*)?(?:user|assistant|system|human|ai|bot|question|answer|q|a|input|output)\s*:",
    flags=re.IGNORECASE,
)
_SCAFFOLD_HEADERS = (INSTRUCTION_HEADER, RESPONSE_HEADER, "### Instruction", "### Response")
_LEADING_NUMBER = re.compile(r"^\s*\d+\s*[.)]")
_FINAL_PUNCTUATION = (".", "?", "!")
# Closing marks that may follow the final punctuation: 'Start with "Hi."' or '(in JSON).'
_CLOSERS = "\"')]”’"

MIN_INSTRUCTION_WORDS = 3
MAX_INSTRUCTION_WORDS = 40

_POOL_FIELDS = frozenset({"instruction", "type", "response", "checks"})


# --------------------------------------------------------------------------------------------
# Text checks shared by the loader and the parser.


def find_chat_markup(text: str) -> str | None:
    """The earliest chat-template marker in ``text`` (e.g. "<start_of_turn>"), or None: every
    family of the one list in utils/chat_markup.py plus its loose fragments ("<|", "</s>"),
    since pools, instructions and constitution texts are plain prose. The tokenizer-derived
    guard in utils.clean_model_loader covers token ids; these texts are text."""
    return _find_markup(text, loose=True)


def find_scaffolding(text: str) -> str | None:
    """Format scaffolding ("Instruction:", "Response:", a role label like "User:"), or None."""
    for header in _SCAFFOLD_HEADERS:
        if header.lower() in text.lower():
            return header
    for line in text.splitlines():
        m = _ROLE_LABEL.match(line)
        if m:
            return m.group(0).strip()
    return None


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def example_id(record: Mapping[str, Any]) -> str:
    """Stable id of a pool record: sha1 of its stripped instruction text, 10 hex chars."""
    return hashlib.sha1(record["instruction"].strip().encode("utf-8")).hexdigest()[:10]


# --------------------------------------------------------------------------------------------
# Pools.


def _validate_checks(value: Any, response: str, path: Path, line: int) -> None:
    if not isinstance(value, list) or not value:
        raise JsonlError(path, line, "must be a non-empty list of {id, kwargs}", "checks")
    for item in value:
        if not isinstance(item, dict) or set(item) != {"id", "kwargs"}:
            raise JsonlError(path, line, f"each check is {{id, kwargs}}, got {item!r}", "checks")
        if item["id"] not in INSTRUCTION_TYPES or not isinstance(item["kwargs"], dict):
            raise JsonlError(
                path, line, f"unknown check id {item['id']!r} or kwargs not an object", "checks"
            )
        try:
            ok = check_instruction(item["id"], response, item["kwargs"])
        except ValueError as e:
            raise JsonlError(path, line, str(e), "checks") from None
        if not ok:
            raise JsonlError(path, line, f"response fails its own check {item['id']}", "checks")


def _validate_text(value: Any, path: Path, line: int, field: str, single_line: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        raise JsonlError(path, line, "must be a non-empty string", field)
    if single_line and "\n" in value.strip():
        raise JsonlError(path, line, "must be a single line", field)
    marker = find_chat_markup(value)
    if marker:
        raise JsonlError(path, line, f"contains chat markup {marker!r}", field)
    scaffold = find_scaffolding(value)
    if scaffold:
        raise JsonlError(path, line, f"contains format scaffolding {scaffold!r}", field)
    return value.strip()


def load_pool(path: str | Path, require_response: bool = False) -> list[dict[str, Any]]:
    """Records of a seed or example pool, validated, each with its ``id`` (``example_id``).

    Every record has a one-line ``instruction`` and a ``type`` from ``KNOWN_TYPES``; a
    ``response`` (required when ``require_response``) is non-empty; optional ``checks`` are
    run against the response. Anything wrong raises ``JsonlError`` naming file:line:field.
    """
    path = Path(path)
    required = ("instruction", "type", "response") if require_response else ("instruction", "type")
    records = read_jsonl_numbered(path, required=required, optional={"type": str})
    if not records:
        raise ValueError(f"{path}: pool is empty")
    seen: dict[str, int] = {}
    pool = []
    for line, record in records:
        extra = sorted(set(record) - _POOL_FIELDS)
        if extra:
            raise JsonlError(
                path, line, f"unknown field(s) {extra}; allowed {sorted(_POOL_FIELDS)}", extra[0]
            )
        instruction = _validate_text(record["instruction"], path, line, "instruction", True)
        if record["type"] not in TYPE_DESCRIPTIONS:
            raise JsonlError(
                path, line, f"unknown type {record['type']!r}; known: {list(KNOWN_TYPES)}", "type"
            )
        out = {"instruction": instruction, "type": record["type"]}
        if "response" in record:
            out["response"] = _validate_text(record["response"], path, line, "response", False)
        if "checks" in record:
            if "response" not in out:
                raise JsonlError(path, line, "checks need a response", "checks")
            _validate_checks(record["checks"], out["response"], path, line)
            out["checks"] = record["checks"]
        key = _normalize(instruction)
        if key in seen:
            raise JsonlError(
                path, line, f"duplicate instruction (first on line {seen[key]})", "instruction"
            )
        seen[key] = line
        out["id"] = example_id(out)
        pool.append(out)
    return pool


def load_seed_instructions(path: str | Path = DEFAULT_SEEDS_PATH) -> list[dict[str, Any]]:
    return load_pool(path)


def load_response_examples(path: str | Path = DEFAULT_EXAMPLES_PATH) -> list[dict[str, Any]]:
    return load_pool(path, require_response=True)


# --------------------------------------------------------------------------------------------
# Instruction-generation prompts.


def _numbered_list(header: str, items: Sequence[str]) -> str:
    for i, item in enumerate(items):
        if not item.strip() or "\n" in item.strip():
            raise ValueError(f"list item {i} must be one non-empty line, got {item!r}")
    if not header.strip() or "\n" in header.strip():
        raise ValueError(f"header must be one non-empty line, got {header!r}")
    lines = [header.strip()]
    lines += [f"{n}. {item.strip()}" for n, item in enumerate(items, start=1)]
    # No trailing space: the model's first token carries its own leading space.
    lines.append(f"{len(items) + 1}.")
    return "\n".join(lines)


def _check_count(n: int, available: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")
    if n > available:
        raise ValueError(f"{what}={n} but only {available} available")


def instruction_list_prompt(
    seeds: Sequence[Mapping[str, Any]],
    rng: random.Random,
    n_examples: int = 8,
    header: str | None = None,
) -> tuple[str, list[str]]:
    """A header, ``n_examples`` random seeds as "1." .. "n.", then the open "n+1.".

    Returns the exact prompt and the ids of the seeds in list order.
    """
    _check_count(n_examples, len(seeds), "n_examples")
    chosen = rng.sample(list(seeds), n_examples)
    prompt = _numbered_list(
        DEFAULT_LIST_HEADER if header is None else header, [s["instruction"] for s in chosen]
    )
    return prompt, [example_id(s) for s in chosen]


def rotate_categories(types: Sequence[str], i: int) -> str:
    """The target category for prompt ``i``: ``types`` in turn, so each gets an equal share."""
    if not types:
        raise ValueError("types is empty")
    return types[i % len(types)]


def category_header(category: str) -> str:
    if category not in TYPE_DESCRIPTIONS:
        raise ValueError(f"unknown category {category!r}; known: {list(KNOWN_TYPES)}")
    return CATEGORY_HEADER_TEMPLATE.format(desc=TYPE_DESCRIPTIONS[category])


def diversity_prompt(
    recent_accepted: Sequence[Mapping[str, Any]],
    seeds: Sequence[Mapping[str, Any]],
    rng: random.Random,
    category: str,
    n_examples: int = 8,
    n_recent: int = 2,
    recent_window: int = 50,
) -> tuple[str, dict[str, Any]]:
    """A numbered list steering the model toward ``category``, with the open next number.

    About half the items are seeds of ``category`` and come last, nearest the open number,
    because a small base model copies the latest items most. Up to ``n_recent`` items are drawn
    from the last ``recent_window`` accepted instructions (so the list does not read as the
    same fixed seeds every time), the rest are seeds of other types. The header names the
    category. Returns the prompt and a provenance dict.
    """
    header = category_header(category)
    if n_recent < 0 or recent_window < 0:
        raise ValueError("n_recent and recent_window must be >= 0")
    for i, r in enumerate(recent_accepted):
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise ValueError(f"recent_accepted[{i}] has no instruction text")
    category_pool = [s for s in seeds if s["type"] == category]
    if not category_pool:
        raise ValueError(f"no seed of category {category!r}")
    n_cat = min(len(category_pool), math.ceil(n_examples / 2))
    cat_items = rng.sample(category_pool, n_cat)
    used = {_normalize(s["instruction"]) for s in cat_items}

    window = list(recent_accepted[-recent_window:]) if recent_window else []
    recent_pool, recent_keys = [], set()
    for r in window:
        key = _normalize(r["instruction"])
        if key not in used and key not in recent_keys:
            recent_keys.add(key)
            recent_pool.append(r)
    n_rec = min(len(recent_pool), n_recent, n_examples - n_cat)
    rec_items = rng.sample(recent_pool, n_rec)
    used |= {_normalize(r["instruction"]) for r in rec_items}

    other_pool = [
        s for s in seeds if s["type"] != category and _normalize(s["instruction"]) not in used
    ]
    n_other = n_examples - n_cat - n_rec
    _check_count(n_examples, n_cat + n_rec + len(other_pool), "n_examples")
    other_items = rng.sample(other_pool, n_other) if n_other else []
    front = [*other_items, *rec_items]
    rng.shuffle(front)
    items = [*front, *cat_items]
    prompt = _numbered_list(header, [r["instruction"] for r in items])
    info = {
        "category": category,
        "header": header,
        "item_ids": [example_id(r) for r in items],
        "seed_ids": [example_id(r) for r in [*other_items, *cat_items]],
        "category_seed_ids": [example_id(r) for r in cat_items],
        "recent_ids": [example_id(r) for r in rec_items],
        "open_number": len(items) + 1,
    }
    return prompt, info


# --------------------------------------------------------------------------------------------
# Parsing a continuation of the numbered list.

PARSE_REASONS: tuple[str, ...] = (
    "ok",
    "empty",
    "chat_markup",
    "scaffolding",
    "starts_number",
    "truncated",
    "needs_input",
    "too_short",
    "too_long",
)


@dataclass(frozen=True)
class ParsedInstruction:
    """One parsed continuation: the clean instruction (None when rejected) and the reason."""

    text: str | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.text is not None


def _ends_sentence(text: str) -> bool:
    return text.rstrip(_CLOSERS).endswith(_FINAL_PUNCTUATION)


def parse_instruction_continuation(completion: str, stopped_at_newline: bool) -> ParsedInstruction:
    """The instruction the model wrote after the open number, or None with the reason.

    ``completion`` is the raw text after the prompt (which ends with "n."). Only its first
    line counts. ``stopped_at_newline`` is True when generation ended naturally (the newline
    stop string or EOS) and False when the token limit cut it: a line without final
    punctuation that was cut by the limit is "truncated" ("How does the weather").
    """
    if find_chat_markup(completion):
        return ParsedInstruction(None, "chat_markup")
    line, newline, _ = completion.partition("\n")
    text = " ".join(line.split())
    if not text:
        return ParsedInstruction(None, "empty")
    if find_scaffolding(text):
        return ParsedInstruction(None, "scaffolding")
    if _LEADING_NUMBER.match(text):
        return ParsedInstruction(None, "starts_number")
    if not (stopped_at_newline or newline) and not _ends_sentence(text):
        return ParsedInstruction(None, "truncated")
    # "Summarize the following text:" expects input on the next lines, which the stop cut off.
    if text.endswith(":"):
        return ParsedInstruction(None, "needs_input")
    n_words = len(text.split())
    if n_words < MIN_INSTRUCTION_WORDS:
        return ParsedInstruction(None, "too_short")
    if n_words > MAX_INSTRUCTION_WORDS:
        return ParsedInstruction(None, "too_long")
    return ParsedInstruction(text, "ok")


# --------------------------------------------------------------------------------------------
# Response-generation prompts.

_NUM = r"(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|twelve|fifteen|twenty)"
# Checked in order; the first match wins (e.g. "one word" before a word limit, "no capital
# letters" as lowercase before "capital letters" as uppercase).
_FORMAT_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (t, re.compile(p, flags=re.IGNORECASE))
    for t, p in (
        ("format_json", r"\bjson\b"),
        ("format_one_word", r"\b(?:one|a single|1)\s+word\b(?!s)"),
        ("format_lowercase", r"lower\s?case|\b(?:no|without)\s+capital letters"),
        ("format_uppercase", r"upper\s?case|capital letters|\ball caps\b"),
        ("format_bullets", r"\bbullet"),
        ("format_title", r"\btitle\b.*(?:<<|angular|angle)"),
        ("format_placeholders", r"placeholder|square brackets"),
        ("format_postscript", r"\bp\.\s?s\.|postscript"),
        ("format_quotation", r"quotation marks|double quotes"),
        ("format_highlights", r"highlight|italics|\*\w"),
        ("format_paragraphs", r"\bparagraphs?\b"),
        ("format_sentence_count", rf"\b{_NUM}\s+sentences?\b"),
        (
            "format_forbidden_word",
            r"\b(?:without|do not|don't|never|avoid)\b[^.]*\b(?:the\s+)?word\b(?!s)",
        ),
        (
            "format_keywords",
            r"\b(?:include|includes|including|use|uses|using|mention|mentions)\s+"
            r"(?:the\s+)?(?:key)?words?\b",
        ),
        ("format_word_limit", rf"\b{_NUM}\s+words\b"),
        (
            "format_start_with",
            r"\b(?:start|begin)s?\s+(?:your|the)\s+(?:answer|reply|response)\b"
            r"|\b(?:answer|reply|response)\s+(?:must|should)\s+(?:start|begin)\b",
        ),
        (
            "format_end_with",
            r"\b(?:end|finish)\s+(?:your|the)\s+(?:answer|reply|response)\b"
            r"|\b(?:answer|reply|response)\s+(?:must|should)\s+end\b|\blast words?\b",
        ),
        ("format_no_comma", r"\bcommas?\b"),
    )
)


def infer_format_type(instruction: str) -> str | None:
    """The format type an instruction asks for ("format_lowercase", ...), or None.

    Generated instructions carry no type; this lets ``response_prompt`` show a demonstration
    of the same constraint, which is what a small base model imitates best.
    """
    for type_name, pattern in _FORMAT_RULES:
        if pattern.search(instruction):
            return type_name
    return None


def response_prompt(
    instruction: str,
    examples: Sequence[Mapping[str, Any]],
    rng: random.Random,
    k: int = 3,
    instruction_type: str | None = None,
) -> tuple[str, list[str]]:
    """A few-shot "Instruction: ...\\nResponse: ..." prompt ending with the open ``Response:``.

    Draws ``k`` examples at random, never one whose instruction equals ``instruction``. When
    an example of the instruction's type exists (``instruction_type``, else
    ``infer_format_type``), one is included and placed last, nearest the target. Returns the
    exact prompt and the example ids in prompt order.
    """
    if not instruction.strip():
        raise ValueError("instruction is empty")
    if instruction_type is not None and instruction_type not in TYPE_DESCRIPTIONS:
        raise ValueError(f"unknown instruction_type {instruction_type!r}")
    target = _normalize(instruction)
    candidates = [e for e in examples if _normalize(e["instruction"]) != target]
    _check_count(k, len(candidates), "k")
    wanted = instruction_type or infer_format_type(instruction)
    same = [e for e in candidates if wanted is not None and e["type"] == wanted]
    if same:
        last = rng.choice(same)
        rest = [e for e in candidates if e is not last]
        chosen = [*rng.sample(rest, k - 1), last]
    else:
        chosen = rng.sample(candidates, k)
    prompt = format_few_shot_prompt(
        [(e["instruction"], e["response"]) for e in chosen], instruction
    )
    return prompt, [example_id(e) for e in chosen]
