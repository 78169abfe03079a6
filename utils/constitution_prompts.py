"""The constitution (``configs/constitution.yaml``: load and validate) and the plain documents the
BASE model continues with it: critique, revision and the two-order A/B judge (pure). The
document headers are defined here because a constitution text must never contain them."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from utils.completion_prompts import find_chat_markup, find_scaffolding
from utils.constitution_config import CAIConfig
from utils.critic_prompts import ANSWER_A, ANSWER_B
from utils.errors import ProjectInputError
from utils.provenance import config_hash
from utils.response_format import (
    END_OF_RESPONSE_MARKER,
    EXAMPLE_SEPARATOR,
    INSTRUCTION_HEADER,
    RESPONSE_HEADER,
    RESPONSE_STOP_STRINGS,
    format_example,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONSTITUTION = REPO_ROOT / "configs" / "constitution.yaml"

# Bump whenever the document layout below changes (headers, stop strings, block order); the
# constitution's own texts are hashed separately. Both are recorded with every label.
CAI_PROMPT_VERSION = "cai-v1"

CRITIQUE_REQUEST_HEADER = "Critique request:"
CRITIQUE_HEADER = "Critique:"
REVISION_REQUEST_HEADER = "Revision request:"
REVISION_HEADER = "Revision:"
CAI_MARKERS: tuple[str, ...] = (
    CRITIQUE_REQUEST_HEADER, CRITIQUE_HEADER, REVISION_REQUEST_HEADER, REVISION_HEADER,
)  # fmt: skip
JUDGE_QUESTION_SUFFIX = "Answer:"

# A critique is one paragraph: it ends at a blank line or where the document moves on (any
# header of this document at a line start; the base model often writes "\nCritique:" again).
CRITIQUE_STOP_STRINGS: tuple[str, ...] = (
    "\n\n",
    *("\n" + m for m in CAI_MARKERS),
    END_OF_RESPONSE_MARKER,
    "\n" + RESPONSE_HEADER,
)
# A revision is a response (it may have paragraphs): it ends where the next block starts.
REVISION_STOP_STRINGS: tuple[str, ...] = (
    *RESPONSE_STOP_STRINGS,
    *("\n" + m for m in CAI_MARKERS),
)

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


# --------------------------------------------------------------------------------------------
# The constitution file.


class ConstitutionError(ProjectInputError, ValueError):
    """A malformed constitution; the message names the file, the entry index and the field."""

    def __init__(
        self, path: str | Path, message: str, index: int | None = None,
        field: str | None = None, kind: str = "principles", entry_id: str | None = None,
    ):  # fmt: skip
        self.path, self.index, self.field = str(path), index, field
        where = str(path)
        if index is not None:
            where += f": {kind}[{index}]" + (f" (id {entry_id!r})" if entry_id else "")
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Principle:
    id: str
    critique_request: str
    revision_request: str
    judge_question: str  # the A/B question; " Answer:" is appended by judge_prompt
    follow_context: str  # contrastive pairs: plain preamble of answers that follow it
    violate_context: str  # ... and of answers that violate it (one paragraph each)


@dataclass(frozen=True)
class Demonstration:
    principle: str  # id of the principle this demonstration applies
    instruction: str
    response: str  # a flawed response
    critique: str  # one paragraph
    revision: str  # the response rewritten to follow the principle


@dataclass(frozen=True)
class Constitution:
    version: str
    critique_header: str
    judge_header: str
    principles: tuple[Principle, ...]
    demonstrations: tuple[Demonstration, ...]
    path: str = ""

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(f"{self.path}: no principle {principle_id!r}")

    def content(self) -> dict[str, Any]:
        """Everything the model reads, without the file path (what the prompt id hashes)."""
        return {k: v for k, v in asdict(self).items() if k != "path"}

    @property
    def sha256(self) -> str:
        return config_hash(self.content())


_TOP_KEYS = ("version", "critique_header", "judge_header", "principles", "demonstrations")
_PRINCIPLE_FIELDS = tuple(f.name for f in fields(Principle))
_DEMO_FIELDS = tuple(f.name for f in fields(Demonstration))
# Fields that must stay on one line: a newline could start a new block of the document.
_ONE_LINE = {"id", "critique_request", "revision_request", "judge_question", "principle",
             "instruction", "version"}  # fmt: skip


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _text(
    path: str | Path, value: Any, field: str, index: int | None, kind: str, entry_id: str | None
) -> str:
    def err(msg: str) -> ConstitutionError:
        return ConstitutionError(path, msg, index, field, kind, entry_id)

    if not isinstance(value, str):
        raise err(f"expected a string, got {type(value).__name__} {value!r}")
    text = value.strip()
    if not text:
        raise err("is empty")
    if field in _ONE_LINE and "\n" in text:
        raise err("must be a single line")
    if field == "critique" and "\n\n" in text:
        raise err("a critique is one paragraph (no blank line: critiques stop at one)")
    if field in ("follow_context", "violate_context") and "\n\n" in text:
        raise err("a context is one paragraph (no blank line: it precedes the instruction)")
    markup = find_chat_markup(text)
    if markup:
        raise err(f"contains chat markup {markup!r}; the base model must never see it")
    scaffold = find_scaffolding(text) or next(
        (m for m in CAI_MARKERS if m.lower() in text.lower()), None
    )
    if scaffold:
        raise err(f"contains the document header {scaffold!r}, which would break the format")
    if field == "judge_question" and text.endswith(JUDGE_QUESTION_SUFFIX):
        raise err(f"must not end with {JUDGE_QUESTION_SUFFIX!r}; judge_prompt appends it")
    if field == "id" and not _ID.match(text):
        raise err(f"{text!r} must match {_ID.pattern} (lowercase letters, digits, _ and -)")
    return text


def _entries(path: str | Path, data: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    items = data[kind]
    if not isinstance(items, list):
        raise ConstitutionError(path, f"{kind!r} must be a list, got {type(items).__name__}")
    if not items:
        raise ConstitutionError(path, f"{kind!r} is an empty list; at least one is needed")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConstitutionError(
                path, f"expected a mapping, got {type(item).__name__}", i, kind=kind
            )
    return items


def _entry(
    path: str | Path, item: Mapping[str, Any], i: int, kind: str, names: Sequence[str]
) -> dict[str, str]:
    entry_id = item.get("id") if isinstance(item.get("id"), str) else None
    unknown = sorted(set(item) - set(names))
    if unknown:
        raise ConstitutionError(
            path, f"unknown field(s) {unknown}; known: {list(names)}", i, unknown[0], kind,
            entry_id,
        )  # fmt: skip
    out = {}
    for name in names:
        if name not in item:
            raise ConstitutionError(path, "missing required field", i, name, kind, entry_id)
        out[name] = _text(path, item[name], name, i, kind, entry_id)
    return out


def parse_constitution(data: Any, path: str | Path = "<constitution>") -> Constitution:
    """Validate an already-parsed YAML document (see ``load_constitution``)."""
    if not isinstance(data, dict):
        raise ConstitutionError(path, f"top level must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConstitutionError(path, f"unknown top-level key(s) {unknown}; known: {_TOP_KEYS}")
    for key in _TOP_KEYS:
        if key not in data:
            raise ConstitutionError(path, f"missing top-level key {key!r}")
    heads = {k: _text(path, data[k], k, None, "", None) for k in _TOP_KEYS[:3]}
    principles = []
    seen: dict[str, int] = {}
    for i, item in enumerate(_entries(path, data, "principles")):
        p = Principle(**_entry(path, item, i, "principles", _PRINCIPLE_FIELDS))
        if p.id in seen:
            raise ConstitutionError(
                path, f"duplicate id (first at principles[{seen[p.id]}])", i, "id",
                entry_id=p.id,
            )  # fmt: skip
        if _normalise(p.follow_context) == _normalise(p.violate_context):
            raise ConstitutionError(
                path, "is identical to follow_context", i, "violate_context", entry_id=p.id
            )
        seen[p.id] = i
        principles.append(p)
    demos = []
    for i, item in enumerate(_entries(path, data, "demonstrations")):
        d = Demonstration(**_entry(path, item, i, "demonstrations", _DEMO_FIELDS))
        if d.principle not in seen:
            raise ConstitutionError(
                path, f"names principle {d.principle!r}, which is not defined; known: "
                f"{list(seen)}", i, "principle", "demonstrations",
            )  # fmt: skip
        if _normalise(d.response) == _normalise(d.revision):
            raise ConstitutionError(
                path, "revision is identical to the response", i, "revision", "demonstrations"
            )
        demos.append(d)
    return Constitution(
        **heads, principles=tuple(principles), demonstrations=tuple(demos), path=str(path)
    )


def load_constitution(path: str | Path = DEFAULT_CONSTITUTION) -> Constitution:
    """Load and validate ``configs/constitution.yaml`` (``yaml.safe_load``).

    Raises ``ConstitutionError`` naming the file, the principle/demonstration index and the
    missing or invalid field: a missing field, a non-string or empty text, an empty list, an
    unknown key, a duplicate id, chat markup or document headers inside a text, a multi-line
    request, a demonstration naming an unknown principle."""
    path = Path(path)
    if not path.is_file():
        raise ConstitutionError(path, "no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConstitutionError(path, f"invalid YAML: {e}") from e
    return parse_constitution(data, path)


# --------------------------------------------------------------------------------------------
# Prompts (pure). Every prompt ends exactly where the model continues: right after "Critique:",
# "Revision:" or "Answer:", with no trailing space (the completion starts with one).


def sample_principle(constitution: Constitution, seed: int, record_id: Any) -> Principle:
    """The principle for one instruction, drawn by a generator seeded by (seed, record id)."""
    rng = random.Random(f"cai:{seed}:{record_id}")
    return rng.choice(constitution.principles)


def check_shots(n_shots: int, constitution: Constitution) -> None:
    if not 0 <= n_shots <= len(constitution.demonstrations):
        raise ValueError(
            f"n_shots must be in 0..{len(constitution.demonstrations)} (demonstrations in "
            f"{constitution.path or 'the constitution'}), got {n_shots}"
        )


def _critique_block(instruction: str, response: str, principle: Principle) -> str:
    return (
        f"{format_example(instruction, response)}\n"
        f"{CRITIQUE_REQUEST_HEADER} {principle.critique_request}\n{CRITIQUE_HEADER}"
    )


def _revision_tail(critique: str, principle: Principle) -> str:
    return f" {critique}\n{REVISION_REQUEST_HEADER} {principle.revision_request}\n{REVISION_HEADER}"


def _demo_block(constitution: Constitution, demo: Demonstration) -> str:
    p = constitution.principle(demo.principle)
    return (
        _critique_block(demo.instruction, demo.response, p)
        + _revision_tail(demo.critique, p)
        + f" {demo.revision}"
    )


def _nonempty(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    return text


def critique_prompt(
    constitution: Constitution, principle: Principle, instruction: str, response: str,
    n_shots: int,
) -> str:  # fmt: skip
    """The critique document: header, ``n_shots`` complete demonstrations (critique and
    revision), then the instruction/response in the shared format and the principle's
    critique request, ending at ``Critique:``."""
    check_shots(n_shots, constitution)
    blocks = [constitution.critique_header]
    blocks += [_demo_block(constitution, d) for d in constitution.demonstrations[:n_shots]]
    blocks.append(
        _critique_block(
            _nonempty(instruction, "instruction"), _nonempty(response, "response"), principle
        )
    )
    return EXAMPLE_SEPARATOR.join(blocks)


def revision_prompt(
    constitution: Constitution, principle: Principle, instruction: str, response: str,
    critique: str, n_shots: int,
) -> str:  # fmt: skip
    """The critique document continued with the model's critique and the revision request,
    ending at ``Revision:``."""
    return critique_prompt(constitution, principle, instruction, response, n_shots) + (
        _revision_tail(_nonempty(critique, "critique"), principle)
    )


def _judge_block(instruction: str, response_a: str, response_b: str, question: str) -> str:
    return (
        f"{INSTRUCTION_HEADER} {instruction}\nResponse A: {response_a}\nResponse B: {response_b}"
        f"\n{question} {JUDGE_QUESTION_SUFFIX}"
    )


def judge_prompt(
    constitution: Constitution, principle: Principle, instruction: str, response_a: str,
    response_b: str, n_shots: int,
) -> str:  # fmt: skip
    """The A/B document ending at ``Answer:`` (the next token is read: " A" or " B").

    Demonstration k shows its response and revision with the revision as A for even k and as
    B for odd k, answered accordingly, so the demonstrated answers alternate A, B, A."""
    check_shots(n_shots, constitution)
    blocks = [constitution.judge_header]
    for k, d in enumerate(constitution.demonstrations[:n_shots]):
        q = constitution.principle(d.principle).judge_question
        rev_is_a = k % 2 == 0
        a, b = (d.revision, d.response) if rev_is_a else (d.response, d.revision)
        blocks.append(_judge_block(d.instruction, a, b, q) + (ANSWER_A if rev_is_a else ANSWER_B))
    blocks.append(
        _judge_block(
            _nonempty(instruction, "instruction"),
            _nonempty(response_a, "response A"),
            _nonempty(response_b, "response B"),
            principle.judge_question,
        )
    )
    return EXAMPLE_SEPARATOR.join(blocks)


def judge_prompts(
    constitution: Constitution, principle: Principle, instruction: str, original: str,
    revision: str, n_shots: int,
) -> tuple[str, str]:  # fmt: skip
    """(revision shown as A, revision shown as B): the two orders ``ab_soft_label`` needs."""
    return (
        judge_prompt(constitution, principle, instruction, revision, original, n_shots),
        judge_prompt(constitution, principle, instruction, original, revision, n_shots),
    )


def cai_prompt_id(constitution: Constitution, cfg: CAIConfig) -> dict[str, Any]:
    """Which documents made a label: layout version, the constitution's content hash and the
    shot counts. Two output directories with the same ``cai_prompt_id`` saw identical prompts
    for identical inputs; a resume with another one is refused."""
    sha = config_hash(
        {
            "layout": CAI_PROMPT_VERSION,
            "constitution": constitution.content(),
            "n_shots": cfg.n_shots,
            "n_shots_judge": cfg.n_shots_judge,
            "stops": [CRITIQUE_STOP_STRINGS, REVISION_STOP_STRINGS, RESPONSE_STOP_STRINGS],
            "answers": [ANSWER_A, ANSWER_B],
        }
    )
    return {
        "prompt_version": CAI_PROMPT_VERSION,
        "constitution_version": constitution.version,
        "constitution_sha256": constitution.sha256,
        "n_shots": cfg.n_shots,
        "n_shots_judge": cfg.n_shots_judge,
        "prompt_sha256": sha,
        "cai_prompt_id": (
            f"{CAI_PROMPT_VERSION}/{constitution.version}/s{cfg.n_shots}j{cfg.n_shots_judge}/"
            f"{sha[:12]}"
        ),
    }
